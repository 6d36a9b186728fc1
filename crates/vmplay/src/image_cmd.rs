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
    /// Replace an existing rootfs.ext4 (and what earlier boots wrote on it)
    /// with a freshly built one; without it an existing one is kept.
    #[arg(long, requires = "rootfs")]
    rebuild_rootfs: bool,
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
        let recipe = out.join(RECIPE);
        let wanted = rootfs_recipe(&options);
        match reuse_rootfs(&rootfs, &recipe, &wanted, args.rebuild_rootfs)? {
            true => progress(&format!(
                "reusing {} (built with the same size and packages; it keeps what earlier \
                 boots wrote: --rebuild-rootfs starts over)",
                rootfs.display()
            )),
            false => {
                // The old recipe goes first: a build cut short leaves no
                // stamp claiming the old image matches.
                let _ = std::fs::remove_file(&recipe);
                vmplay_image::build_rootfs(&rootfs, &options, &mut progress)
                    .context("cannot build the root file system")?;
                write_atomically(&recipe, |f| std::io::Write::write_all(f, wanted.as_bytes()))?;
                progress(&format!("wrote {}", rootfs.display()));
            }
        }
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

/// Beside rootfs.ext4: what it was built from, so a second run can reuse it.
const RECIPE: &str = "rootfs.ext4.recipe";

/// The build inputs of a root file system, one per line.
fn rootfs_recipe(options: &vmplay_image::RootfsOptions) -> String {
    let mut packages = options.packages.clone();
    packages.sort();
    packages.dedup();
    format!("size {}\npackages {}\n", options.size, packages.join(","))
}

/// Whether the existing `rootfs` is kept: it is when its recipe matches.
/// A disk that earlier boots may have written to is never replaced
/// silently: a different or missing recipe is an error unless `rebuild`.
fn reuse_rootfs(rootfs: &Path, recipe: &Path, wanted: &str, rebuild: bool) -> Result<bool> {
    if rebuild || !rootfs.exists() {
        return Ok(false);
    }
    let had = std::fs::read_to_string(recipe).ok();
    if had.as_deref() == Some(wanted) {
        return Ok(true);
    }
    let why = match had {
        Some(had) => format!(
            "it was built with {} and this run asks for {}",
            had.trim().replace('\n', ", "),
            wanted.trim().replace('\n', ", ")
        ),
        None => "vmplay did not build it (no rootfs.ext4.recipe beside it)".into(),
    };
    anyhow::bail!(
        "{} exists and {why}; it may hold what earlier boots wrote, so it is kept: \
         pass --rebuild-rootfs to replace it, or --out another directory",
        rootfs.display()
    )
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

    fn options(size: u64, packages: &[&str]) -> vmplay_image::RootfsOptions {
        vmplay_image::RootfsOptions {
            size,
            packages: packages.iter().map(|p| p.to_string()).collect(),
            suite: None,
        }
    }

    #[test]
    fn the_recipe_ignores_package_order_and_repeats() {
        assert_eq!(
            rootfs_recipe(&options(1 << 30, &["curl", "bash", "curl"])),
            rootfs_recipe(&options(1 << 30, &["bash", "curl"]))
        );
        assert_ne!(
            rootfs_recipe(&options(1 << 30, &["bash"])),
            rootfs_recipe(&options(2 << 30, &["bash"]))
        );
    }

    #[test]
    fn an_existing_root_file_system_is_reused_only_when_it_matches_and_never_replaced_silently() {
        let dir = std::env::temp_dir().join(format!("vmplay-recipe-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (rootfs, recipe) = (dir.join("rootfs.ext4"), dir.join(RECIPE));
        let wanted = rootfs_recipe(&options(1 << 30, &["bash"]));
        // Nothing there: build.
        assert!(!reuse_rootfs(&rootfs, &recipe, &wanted, false).unwrap());
        std::fs::write(&rootfs, b"disk").unwrap();
        // A disk without a recipe is not ours to replace.
        let err = reuse_rootfs(&rootfs, &recipe, &wanted, false).unwrap_err();
        assert!(err.to_string().contains("--rebuild-rootfs"), "{err}");
        std::fs::write(&recipe, &wanted).unwrap();
        assert!(reuse_rootfs(&rootfs, &recipe, &wanted, false).unwrap());
        // Asked for other packages: refused, naming both.
        let other = rootfs_recipe(&options(1 << 30, &["curl"]));
        let err = reuse_rootfs(&rootfs, &recipe, &other, false).unwrap_err();
        assert!(err.to_string().contains("packages bash"), "{err}");
        assert!(err.to_string().contains("packages curl"), "{err}");
        assert!(!reuse_rootfs(&rootfs, &recipe, &other, true).unwrap());
        assert_eq!(std::fs::read(&rootfs).unwrap(), b"disk");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn quotes_paths_only_when_the_shell_needs_it() {
        assert_eq!(shell_quote(Path::new("/a/b-c.cpio")), "/a/b-c.cpio");
        assert_eq!(shell_quote(Path::new("/a b/it's")), r"'/a b/it'\''s'");
    }
}
