//! `vmplay image debian`: fetch Debian's cloud kernel and busybox, build
//! the initramfs, write a Firecracker config for it and print the command
//! that boots it.

use anyhow::{Context, Result};
use std::path::{Path, PathBuf};
use vmplay_image::{DebianAssets, Initramfs, write_atomically};

#[derive(clap::Args)]
pub struct ImageArgs {
    #[command(subcommand)]
    distro: Distro,
}

#[derive(clap::Subcommand)]
enum Distro {
    /// Debian's stock cloud kernel and a busybox initramfs (virtio modules,
    /// ip= networking, root= switching, an interactive shell).
    Debian(DebianArgs),
}

#[derive(clap::Args)]
struct DebianArgs {
    /// Where to write vmlinuz, initramfs.cpio and vmplay.json.
    #[arg(long, value_name = "DIR", default_value = "guest-assets/debian")]
    out: PathBuf,
    /// Where the fetched packages are kept and reused [default: the --out directory].
    #[arg(long, value_name = "DIR")]
    cache: Option<PathBuf>,
    /// A script for the guest to run instead of the shell (it becomes
    /// /etc/vmplay/run); the VM powers off when it ends.
    #[arg(long, value_name = "FILE")]
    run: Option<PathBuf>,
    /// Also build rootfs.ext4, a real Debian (mmdebstrap minbase) to boot
    /// as the root drive; the image's init starts bash on the console.
    #[arg(long)]
    rootfs: bool,
    /// Size of rootfs.ext4: a number with K/M/G suffix; a bare number is MiB.
    #[arg(long, value_name = "SIZE", default_value = "2G", requires = "rootfs")]
    size: String,
    /// Packages to add to rootfs.ext4, comma-separated (`--packages curl,python3`).
    #[arg(
        long,
        value_name = "A,B,...",
        value_delimiter = ',',
        requires = "rootfs"
    )]
    packages: Vec<String>,
}

/// The command line the printed `vmplay run` and the config file use.
pub const BOOT_ARGS: &str = "console=ttyS0 reboot=t panic=-1 quiet";
const MEMORY_MIB: u64 = 512;

pub fn run(args: &ImageArgs) -> Result<()> {
    match &args.distro {
        Distro::Debian(args) => debian(args),
    }
}

fn progress(line: &str) {
    eprintln!("vmplay image: {line}");
}

fn absolute(path: &Path) -> Result<PathBuf> {
    std::path::absolute(path)
        .with_context(|| format!("{}: cannot make it absolute", path.display()))
}

fn debian(args: &DebianArgs) -> Result<()> {
    let out = absolute(&args.out)?;
    let cache = match &args.cache {
        Some(c) => absolute(c)?,
        None => out.clone(),
    };
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    let assets = DebianAssets::fetch(&cache, &mut progress).with_context(|| {
        format!(
            "cannot fetch Debian's kernel and busybox into {}",
            cache.display()
        )
    })?;
    progress(&format!(
        "kernel {} {} (uname -r: {})",
        assets.kernel_package(),
        assets.kernel_version(),
        assets.kernel_release()
    ));

    let kernel = out.join("vmlinuz");
    let same = |a: &Path, b: &Path| matches!((a.canonicalize(), b.canonicalize()), (Ok(x), Ok(y)) if x == y);
    if !same(&kernel, assets.kernel()) {
        let bytes = std::fs::read(assets.kernel())
            .with_context(|| format!("cannot read {}", assets.kernel().display()))?;
        write_atomically(&kernel, |f| std::io::Write::write_all(f, &bytes))?;
    }

    progress("building the initramfs");
    let initrd = out.join("initramfs.cpio");
    let mut image = Initramfs::debian(&assets).context("cannot build the initramfs")?;
    if let Some(script) = &args.run {
        image = image
            .host_file(vmplay_image::RUN_HOOK, script)
            .with_context(|| format!("--run {}", script.display()))?;
    }
    image.write(&initrd).context("cannot write the initramfs")?;
    let size = std::fs::metadata(&initrd).map(|m| m.len()).unwrap_or(0);
    progress(&format!("wrote {} ({} KiB)", initrd.display(), size >> 10));

    let rootfs = out.join("rootfs.ext4");
    if args.rootfs {
        let size =
            vmplay_machine::parse_size(&args.size).map_err(|e| anyhow::anyhow!("--size {e}"))?;
        let options = vmplay_image::RootfsOptions {
            size,
            packages: args.packages.clone(),
            suite: None,
        };
        vmplay_image::build_rootfs(&rootfs, &options, &mut progress)
            .context("cannot build the root file system")?;
        progress(&format!("wrote {}", rootfs.display()));
    }
    let drives = match args.rootfs {
        true => serde_json::json!([{
            "drive_id": "rootfs",
            "path_on_host": rootfs,
            "is_root_device": true,
            "is_read_only": false,
        }]),
        false => serde_json::json!([]),
    };

    let config = out.join("vmplay.json");
    let json = serde_json::json!({
        "boot-source": {
            "kernel_image_path": kernel,
            "initrd_path": initrd,
            "boot_args": BOOT_ARGS,
        },
        "drives": drives,
        "machine-config": { "vcpu_count": 1, "mem_size_mib": MEMORY_MIB },
    });
    let text = serde_json::to_string_pretty(&json)? + "\n";
    write_atomically(&config, |f| std::io::Write::write_all(f, text.as_bytes()))?;
    progress(&format!(
        "wrote {} (a Firecracker --config-file)",
        config.display()
    ));

    let exe = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "vmplay".into());
    progress(match args.run {
        None => "boot it to a shell (exit or poweroff stops the VM) with:",
        Some(_) => "boot it (it runs the --run script, then powers off) with:",
    });
    let drive = match args.rootfs {
        true => format!(" --drive path={},root=on", shell_quote(&rootfs)),
        false => String::new(),
    };
    println!(
        "{exe} run --kernel {} --initrd {} --cmdline '{BOOT_ARGS}' --memory {MEMORY_MIB}M{drive}",
        shell_quote(&kernel),
        shell_quote(&initrd)
    );
    progress(&format!("or: {exe} run --config {}", shell_quote(&config)));
    Ok(())
}

/// `path` as one shell word.
fn shell_quote(path: &Path) -> String {
    let text = path.display().to_string();
    if text
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "/._-+%:,=@".contains(c))
    {
        text
    } else {
        format!("'{}'", text.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_paths_only_when_the_shell_needs_it() {
        assert_eq!(shell_quote(Path::new("/a/b-c.cpio")), "/a/b-c.cpio");
        assert_eq!(shell_quote(Path::new("/a b/it's")), r"'/a b/it'\''s'");
    }
}
