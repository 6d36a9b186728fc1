//! Firecracker's microVM metadata service data store: one JSON document,
//! replaced by `PUT /mmds`, merged by `PATCH /mmds` (RFC 7396), read by
//! `GET /mmds` and, later, by guests through virtio-net. It lives here,
//! beside the devices, so the network device can reach it without
//! depending on the API.

use serde_json::Value;

/// Firecracker's default data store limit (= the API payload limit).
pub const DEFAULT_SIZE_LIMIT: usize = 51200;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MmdsError {
    #[error("The MMDS data store is not initialized.")]
    NotInitialized,
    #[error("The MMDS patch request doesn't fit.")]
    DataStoreLimitExceeded,
}

/// The data store.
#[derive(Debug, Clone)]
pub struct Mmds {
    data: Option<Value>,
    size_limit: usize,
}

impl Default for Mmds {
    fn default() -> Self {
        Mmds::new(DEFAULT_SIZE_LIMIT)
    }
}

impl Mmds {
    /// An empty store that holds at most `size_limit` bytes of serialized JSON.
    pub fn new(size_limit: usize) -> Mmds {
        Mmds {
            data: None,
            size_limit,
        }
    }

    fn check(&self, v: &Value) -> Result<(), MmdsError> {
        let size = serde_json::to_vec(v).map(|b| b.len()).unwrap_or(usize::MAX);
        if size > self.size_limit {
            return Err(MmdsError::DataStoreLimitExceeded);
        }
        Ok(())
    }

    /// `PUT /mmds`: replaces the whole store.
    pub fn put(&mut self, v: Value) -> Result<(), MmdsError> {
        self.check(&v)?;
        self.data = Some(v);
        Ok(())
    }

    /// `PATCH /mmds`: a JSON merge patch onto the store; fails before any PUT.
    pub fn patch(&mut self, patch: Value) -> Result<(), MmdsError> {
        let mut data = self.data.clone().ok_or(MmdsError::NotInitialized)?;
        merge_patch(&mut data, patch);
        self.check(&data)?;
        self.data = Some(data);
        Ok(())
    }

    /// `GET /mmds`: the store, `{}` while empty.
    pub fn get(&self) -> Value {
        match &self.data {
            None | Some(Value::Null) => Value::Object(Default::default()),
            Some(v) => v.clone(),
        }
    }

    /// The value at a JSON pointer (`/a/b/0`), for guest requests.
    pub fn lookup(&self, pointer: &str) -> Option<&Value> {
        self.data.as_ref()?.pointer(pointer)
    }
}

/// RFC 7396: objects merge key by key, `null` deletes, anything else replaces.
pub fn merge_patch(target: &mut Value, patch: Value) {
    match patch {
        Value::Object(patch) => {
            if !target.is_object() {
                *target = Value::Object(Default::default());
            }
            if let Value::Object(map) = target {
                for (k, v) in patch {
                    if v.is_null() {
                        map.remove(&k);
                    } else {
                        merge_patch(map.entry(k).or_insert(Value::Null), v);
                    }
                }
            }
        }
        other => *target = other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn empty_store_reads_as_an_empty_object_and_refuses_a_patch() {
        let mut m = Mmds::default();
        assert_eq!(m.get(), json!({}));
        assert_eq!(m.patch(json!({"a": 1})), Err(MmdsError::NotInitialized));
    }

    #[test]
    fn patch_merges_as_rfc_7396() {
        let mut m = Mmds::default();
        m.put(json!({"a": {"b": 1, "c": 2}, "d": [1, 2]})).unwrap();
        m.patch(json!({"a": {"b": null, "e": 3}, "d": "x"}))
            .unwrap();
        assert_eq!(m.get(), json!({"a": {"c": 2, "e": 3}, "d": "x"}));
        assert_eq!(m.lookup("/a/e"), Some(&json!(3)));
    }

    #[test]
    fn the_size_limit_counts_serialized_bytes() {
        let mut m = Mmds::new(10);
        assert_eq!(
            m.put(json!({"a": "1234"})),
            Err(MmdsError::DataStoreLimitExceeded)
        );
        let mut m = Mmds::new(12);
        m.put(json!({"a": "1234"})).unwrap();
        assert_eq!(
            m.patch(json!({"b": 1})),
            Err(MmdsError::DataStoreLimitExceeded)
        );
        assert_eq!(m.get(), json!({"a": "1234"}));
    }
}
