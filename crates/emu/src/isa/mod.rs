//! The instruction families, one module each (Bochs-style). Each has
//! `register(t)`, which maps iced `Code`s to handlers; see DESIGN.md.

pub mod ops;

mod arith;
mod bcd;
mod bit;
pub(crate) mod bmi;
mod control;
pub(crate) mod ext;
mod hypercall;
mod io;
mod legacy;
mod logic;
mod mov;
mod muldiv;
mod shift;
mod sse;
mod stack;
mod string;
mod system;
pub(crate) mod x87;
pub(crate) mod xsave;

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use iced_x86::Code;

use crate::decode::Table;

/// Fills `t` from every family.
pub fn register_all(t: &mut Table) {
    arith::register(t);
    logic::register(t);
    mov::register(t);
    stack::register(t);
    control::register(t);
    shift::register(t);
    muldiv::register(t);
    string::register(t);
    io::register(t);
    system::register(t);
    bit::register(t);
    bmi::register(t);
    ext::register(t);
    bcd::register(t);
    legacy::register(t);
    x87::register(t);
    sse::register(t);
    xsave::register(t);
    hypercall::register(t);
}

fn names() -> &'static HashMap<String, Code> {
    static NAMES: OnceLock<HashMap<String, Code>> = OnceLock::new();
    NAMES.get_or_init(|| Code::values().map(|c| (format!("{c:?}"), c)).collect())
}

/// Names registered that iced does not know (a test keeps this empty).
pub fn missing_names() -> &'static Mutex<Vec<String>> {
    static MISSING: OnceLock<Mutex<Vec<String>>> = OnceLock::new();
    MISSING.get_or_init(|| Mutex::new(Vec::new()))
}

/// The iced `Code` called `name` (as in `Code::Add_rm8_r8`), so families
/// can register forms by generated names. Unknown names map to INVALID
/// (which the table never consults) and are recorded for the test.
pub fn c(name: &str) -> Code {
    match names().get(name) {
        Some(&code) => code,
        None => {
            if let Ok(mut m) = missing_names().lock() {
                m.push(name.to_string());
            }
            Code::INVALID
        }
    }
}

/// Condition-code suffixes in encoding order (cc = 0..15).
pub const CC: [&str; 16] = [
    "o", "no", "b", "ae", "e", "ne", "be", "a", "s", "ns", "p", "np", "l", "ge", "le", "g",
];

#[cfg(test)]
mod tests {
    #[test]
    fn every_registered_name_is_an_iced_code() {
        let _ = crate::decode::table::table();
        let missing = super::missing_names()
            .lock()
            .map(|m| m.clone())
            .unwrap_or_default();
        assert!(missing.is_empty(), "unknown iced Code names: {missing:?}");
    }
}
