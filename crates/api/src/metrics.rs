//! Firecracker's metrics: one JSON object per line (NDJSON) to the metrics
//! path, on `FlushMetrics`, every 60 s while the VM runs, and at exit.
//! Counters report the change since the previous line; "store" values
//! (latencies, start-up times) report their current value. Only groups
//! and fields vmplay has a counter for are written, with Firecracker's
//! names and meanings.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Mutex;
use std::time::Duration;

type Group = BTreeMap<&'static str, u64>;

/// Counters kept elsewhere (the vCPUs', the devices'): `(group, field,
/// total so far)`.
pub type Source = Box<dyn Fn() -> Vec<(String, String, u64)> + Send>;

#[derive(Default)]
struct State {
    target: Option<std::fs::File>,
    counters: BTreeMap<&'static str, Group>,
    stores: BTreeMap<&'static str, Group>,
    sources: Vec<Source>,
    /// What each source said at the previous line.
    last: BTreeMap<(String, String), u64>,
}

/// The metrics system of one process.
#[derive(Default)]
pub struct Metrics {
    state: Mutex<State>,
}

/// CPU time this process has used, in µs.
#[allow(unsafe_code)]
pub fn process_cpu_us() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1000
}

impl Metrics {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `--metrics-path` / `PUT /metrics`: once per process.
    pub fn init(&self, path: &str) -> Result<(), String> {
        let mut s = self.lock();
        if s.target.is_some() {
            return Err("Cannot initialize the metrics system due to bad user input: Reinitialization of metrics not allowed.".into());
        }
        let file = OpenOptions::new()
            .create(true)
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .map_err(|e| {
                format!("Cannot initialize the metrics system due to bad user input: {e}")
            })?;
        s.target = Some(file);
        Ok(())
    }

    /// Adds one to a counter.
    pub fn count(&self, group: &'static str, field: &'static str) {
        *self
            .lock()
            .counters
            .entry(group)
            .or_default()
            .entry(field)
            .or_default() += 1;
    }

    /// Sets a store metric.
    pub fn store(&self, group: &'static str, field: &'static str, value: u64) {
        self.lock()
            .stores
            .entry(group)
            .or_default()
            .insert(field, value);
    }

    /// Adds counters kept elsewhere; each line reports their change.
    pub fn add_source(&self, source: Source) {
        self.lock().sources.push(source);
    }

    /// Records a latency in `latencies_us`.
    pub fn latency(&self, field: &'static str, d: Duration) {
        self.store("latencies_us", field, d.as_micros() as u64);
    }

    /// The next line, as JSON; counters restart from zero.
    fn line(s: &mut State) -> String {
        Self::line_from(s, true)
    }

    /// [`Metrics::line`]; without `sources` the counters kept elsewhere
    /// are left out (they take the devices' locks).
    fn line_from(s: &mut State, sources: bool) -> String {
        let mut top = serde_json::Map::new();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as u64;
        top.insert("utc_timestamp_ms".into(), now.into());
        let mut groups: BTreeMap<String, serde_json::Map<String, serde_json::Value>> =
            BTreeMap::new();
        for (g, fields) in s.stores.iter() {
            let e = groups.entry(g.to_string()).or_default();
            for (f, v) in fields {
                e.insert((*f).into(), (*v).into());
            }
        }
        let mut from_sources = Vec::new();
        for source in s.sources.iter().filter(|_| sources) {
            from_sources.extend(source());
        }
        for (g, f, total) in from_sources {
            let last = s.last.insert((g.clone(), f.clone()), total).unwrap_or(0);
            groups
                .entry(g)
                .or_default()
                .insert(f, total.saturating_sub(last).into());
        }
        for (g, fields) in s.counters.iter_mut() {
            let e = groups.entry(g.to_string()).or_default();
            for (f, v) in fields.iter_mut() {
                e.insert((*f).into(), (*v).into());
                *v = 0;
            }
        }
        for (g, m) in groups {
            top.insert(g, m.into());
        }
        serde_json::Value::Object(top).to_string()
    }

    /// Sets a store metric and writes a line, from a signal handler: gives
    /// up (returns false) rather than wait for a thread that holds the
    /// metrics.
    pub fn try_store_and_flush(
        &self,
        group: &'static str,
        field: &'static str,
        value: u64,
    ) -> bool {
        let mut s = match self.state.try_lock() {
            Ok(s) => s,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return false,
        };
        s.stores.entry(group).or_default().insert(field, value);
        if s.target.is_some() {
            // The faulting thread may hold a device's lock: no sources.
            let mut line = Self::line_from(&mut s, false);
            line.push('\n');
            if let Some(f) = s.target.as_mut() {
                let _ = f.write_all(line.as_bytes());
            }
        }
        true
    }

    /// Writes one line now. Without a metrics path it does nothing.
    pub fn flush(&self) -> Result<(), String> {
        let mut s = self.lock();
        if s.target.is_none() {
            return Ok(());
        }
        let mut line = Self::line(&mut s);
        line.push('\n');
        if let Some(f) = s.target.as_mut() {
            f.write_all(line.as_bytes()).map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_report_deltas_and_stores_keep_values() {
        let m = Metrics::default();
        m.count("get_api_requests", "instance_info_count");
        m.count("get_api_requests", "instance_info_count");
        m.store("api_server", "process_startup_time_us", 7);
        let first: serde_json::Value = serde_json::from_str(&Metrics::line(&mut m.lock())).unwrap();
        assert_eq!(first["get_api_requests"]["instance_info_count"], 2);
        assert_eq!(first["api_server"]["process_startup_time_us"], 7);
        let second: serde_json::Value =
            serde_json::from_str(&Metrics::line(&mut m.lock())).unwrap();
        assert_eq!(second["get_api_requests"]["instance_info_count"], 0);
        assert_eq!(second["api_server"]["process_startup_time_us"], 7);
    }

    #[test]
    fn metrics_initialise_once() {
        let m = Metrics::default();
        let p = std::env::temp_dir().join(format!("vmplay-metrics-{}", std::process::id()));
        m.init(p.to_str().unwrap()).unwrap();
        assert!(
            m.init(p.to_str().unwrap())
                .unwrap_err()
                .contains("Reinitialization of metrics not allowed.")
        );
        std::fs::remove_file(&p).ok();
    }
}
