//! `--accel auto`: KVM only where it runs a stock kernel at hardware speed.
//!
//! `/dev/kvm` is not proof of that. On a nested host whose KVM is
//! `kvm_pvm` (a paravirtualised KVM without VT-x/AMD-V) the host emulates
//! every ring-0 guest instruction that touches privileged state, and a
//! stock kernel boots far slower than on vmplay's software CPU. So auto
//! picks `kvm` only when `/dev/kvm` opens and is not `kvm_pvm`.

use std::path::Path;

/// What the host's KVM is, as far as `--accel` cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostKvm {
    /// `/dev/kvm` does not exist.
    Absent,
    /// `/dev/kvm` exists but cannot be opened read-write (the error).
    Unopenable(String),
    /// `/dev/kvm` opens, but it is kvm_pvm.
    Pvm,
    /// `/dev/kvm` opens and is hardware-assisted KVM.
    Hardware,
}

/// The backend `--accel auto` picked and why, as one line for stderr.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AutoChoice {
    pub kvm: bool,
    pub why: String,
}

/// Looks at `/dev/kvm` and the loaded modules (`/sys/module`, `/proc/modules`).
pub fn probe() -> HostKvm {
    let pvm = Path::new("/sys/module/kvm_pvm").exists()
        || std::fs::read_to_string("/proc/modules").is_ok_and(|text| modules_list_pvm(&text));
    classify(
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .map(drop),
        pvm,
    )
}

fn modules_list_pvm(proc_modules: &str) -> bool {
    proc_modules
        .lines()
        .any(|line| line.split_whitespace().next() == Some("kvm_pvm"))
}

fn classify(open: std::io::Result<()>, pvm: bool) -> HostKvm {
    match open {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => HostKvm::Absent,
        Err(e) => HostKvm::Unopenable(e.to_string()),
        Ok(()) if pvm => HostKvm::Pvm,
        Ok(()) => HostKvm::Hardware,
    }
}

/// What `--accel auto` does on a host like `host`; `trace` (`--trace`,
/// emu only) forces emu.
pub fn choose(host: &HostKvm, trace: bool) -> AutoChoice {
    let emu = |why: String| AutoChoice {
        kvm: false,
        why: format!("vmplay: --accel auto: using emu (vmplay's software CPU): {why}"),
    };
    match host {
        _ if trace => emu("--trace needs it".into()),
        HostKvm::Absent => emu("there is no /dev/kvm".into()),
        HostKvm::Unopenable(e) => emu(format!("cannot open /dev/kvm: {e}")),
        HostKvm::Pvm => emu("this host's KVM is kvm_pvm (nested, no VT-x/AMD-V), \
             on which a stock kernel's ring-0 code runs far slower"
            .into()),
        HostKvm::Hardware => AutoChoice {
            kvm: true,
            why: "vmplay: --accel auto: using kvm (hardware-assisted /dev/kvm)".into(),
        },
    }
}

/// The warning for an explicit `--accel kvm` on kvm_pvm, if that is the host.
pub fn kvm_warning(host: &HostKvm) -> Option<&'static str> {
    (*host == HostKvm::Pvm).then_some(
        "vmplay: warning: this host's KVM is kvm_pvm: the host emulates the guest's \
         ring-0 code, so a stock kernel boots far slower than on --accel emu",
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Error, ErrorKind};

    #[test]
    fn auto_picks_kvm_only_on_hardware_kvm() {
        assert!(choose(&HostKvm::Hardware, false).kvm);
        for host in [
            HostKvm::Absent,
            HostKvm::Unopenable("Permission denied".into()),
            HostKvm::Pvm,
        ] {
            let choice = choose(&host, false);
            assert!(!choice.kvm, "{host:?}");
            assert!(choice.why.contains("using emu"), "{}", choice.why);
            assert!(!choice.why.contains('\n'));
        }
        assert!(!choose(&HostKvm::Hardware, true).kvm, "--trace forces emu");
    }

    #[test]
    fn auto_says_why_it_chose_emu() {
        assert!(choose(&HostKvm::Absent, false).why.contains("no /dev/kvm"));
        assert!(
            choose(
                &HostKvm::Unopenable("Permission denied (os error 13)".into()),
                false
            )
            .why
            .contains("cannot open /dev/kvm: Permission denied")
        );
        assert!(choose(&HostKvm::Pvm, false).why.contains("kvm_pvm"));
    }

    #[test]
    fn classifies_dev_kvm_and_the_loaded_modules() {
        assert_eq!(
            classify(Err(Error::from(ErrorKind::NotFound)), true),
            HostKvm::Absent
        );
        assert!(matches!(
            classify(Err(Error::from(ErrorKind::PermissionDenied)), false),
            HostKvm::Unopenable(_)
        ));
        assert_eq!(classify(Ok(()), true), HostKvm::Pvm);
        assert_eq!(classify(Ok(()), false), HostKvm::Hardware);
        assert!(modules_list_pvm(
            "kvm_pvm 1234 0 - Live 0x0\nkvm 1 1 kvm_pvm, Live 0x0\n"
        ));
        assert!(!modules_list_pvm(
            "kvm_intel 1 0 - Live 0x0\nkvm 1 1 kvm_intel, Live 0x0\n"
        ));
    }

    #[test]
    fn explicit_kvm_warns_only_on_kvm_pvm() {
        assert!(kvm_warning(&HostKvm::Pvm).is_some_and(|w| w.contains("kvm_pvm")));
        assert!(kvm_warning(&HostKvm::Hardware).is_none());
    }
}
