//! What `deploy/dist.sh` made (the README's test command runs it before
//! the tests): the portable binaries, as shipped in the tarballs and the
//! packages, need no glibc symbol newer than 2.17 and run; the checksums
//! hold; each .deb holds its binary, unit, user, data dir and docs, with
//! their modes, and maintainer scripts that make the user and data dir.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use modi_tests::{bin, bin_dir, run};

/// The newest glibc the binaries may need.
const GLIBC_FLOOR: (u32, u32) = (2, 17);

/// `target/dist`, beside the profile folder the tests run from.
fn dist_dir() -> PathBuf {
    let dir = bin_dir().parent().expect("the target dir").join("dist");
    assert!(
        dir.join("SHA256SUMS").is_file(),
        "{} has no artefacts: run deploy/dist.sh first, as the README's test command does",
        dir.display()
    );
    dir
}

fn version() -> String {
    let out = run(Command::new(bin("modi")).arg("--version"));
    out.ok().trim().trim_start_matches("modi ").to_string()
}

/// The file in the dist dir with this name, which must exist.
fn artefact(name: &str) -> PathBuf {
    let path = dist_dir().join(name);
    assert!(path.is_file(), "{} is missing", path.display());
    path
}

/// Every `GLIBC_x.y[.z]` version the binary's dynamic symbols need.
fn glibc_versions(binary: &Path) -> Vec<(u32, u32)> {
    let out = run(Command::new("objdump").arg("-T").arg(binary));
    let text = out.ok();
    let mut found: Vec<(u32, u32)> = text
        .split(|c: char| c.is_whitespace() || c == '(' || c == ')')
        .filter_map(|w| w.strip_prefix("GLIBC_"))
        .filter_map(|v| {
            let mut parts = v.split('.').map(|p| p.parse::<u32>());
            match (parts.next(), parts.next()) {
                (Some(Ok(major)), Some(Ok(minor))) => Some((major, minor)),
                _ => None,
            }
        })
        .collect();
    found.sort();
    found.dedup();
    found
}

fn check_portable(binary: &Path) {
    let versions = glibc_versions(binary);
    assert!(
        !versions.is_empty(),
        "{}: no GLIBC symbol versions at all (not a dynamic glibc binary?)",
        binary.display()
    );
    let newest = *versions.last().unwrap();
    assert!(
        newest <= GLIBC_FLOOR,
        "{} needs GLIBC_{}.{}, newer than {}.{}: {versions:?}",
        binary.display(),
        newest.0,
        newest.1,
        GLIBC_FLOOR.0,
        GLIBC_FLOOR.1
    );
    let out = run(Command::new(binary).arg("--version"));
    assert!(out.ok().contains(&version()), "{out:#?}");
}

fn untar(tarball: &Path) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    run(Command::new("tar")
        .arg("-xzf")
        .arg(tarball)
        .arg("-C")
        .arg(dir.path()))
    .ok();
    dir
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn the_tarballs_hold_portable_binaries_and_the_checksums_hold() {
    let dist = dist_dir();
    let check = run(Command::new("sha256sum")
        .args(["--check", "--strict", "SHA256SUMS"])
        .current_dir(&dist));
    check.ok();
    let sums = read(&dist.join("SHA256SUMS"));
    let v = version();
    for name in ["modi", "modi-agent"] {
        let tarball = format!("{name}-{v}-x86_64-linux-gnu.tar.gz");
        assert!(
            sums.contains(&tarball),
            "{tarball} not in SHA256SUMS:\n{sums}"
        );
        let dir = untar(&artefact(&tarball));
        let top = dir.path().join(format!("{name}-{v}"));
        let binary = top.join(name);
        assert_eq!(mode(&binary), 0o755);
        check_portable(&binary);
        let unit = read(&top.join(format!("{name}.service")));
        assert!(
            unit.contains(&format!("ExecStart=/usr/local/bin/{name} ")),
            "the tarball's unit runs the tarball's path:\n{unit}"
        );
        assert!(top.join("README.md").is_file());
    }
}

/// A .deb, unpacked: its files, its control fields and its scripts.
struct Deb {
    root: tempfile::TempDir,
    control: BTreeMap<String, String>,
    postinst: String,
    scripts: String,
}

fn unpack(deb: &Path) -> Deb {
    let root = tempfile::tempdir().unwrap();
    run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(root.path())).ok();
    let info = run(Command::new("dpkg-deb").arg("-I").arg(deb));
    let control = info
        .ok()
        .lines()
        .filter_map(|l| l.trim().split_once(": "))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let postinst = run(Command::new("dpkg-deb").arg("-I").arg(deb).arg("postinst"));
    let postinst = postinst.ok().to_string();
    let scripts = info.stdout.clone();
    Deb {
        root,
        control,
        postinst,
        scripts,
    }
}

impl Deb {
    fn path(&self, rel: &str) -> PathBuf {
        let path = self.root.path().join(rel);
        assert!(
            path.exists(),
            "{rel} is not in the package: {:#?}",
            run(Command::new("find").arg(self.root.path())).stdout
        );
        path
    }

    /// The unit, wherever cargo-deb put it (lib/ or usr/lib/).
    fn unit(&self, name: &str) -> String {
        for dir in ["lib/systemd/system", "usr/lib/systemd/system"] {
            let path = self.root.path().join(dir).join(name);
            if path.is_file() {
                assert_eq!(mode(&path), 0o644);
                return read(&path);
            }
        }
        panic!("{name} is not in the package")
    }
}

#[test]
fn the_controller_package_has_its_binary_agent_unit_user_data_dir_and_docs() {
    let v = version();
    let deb = unpack(&artefact(&format!("modi_{v}-1_amd64.deb")));
    assert_eq!(deb.control["Package"], "modi");
    assert_eq!(deb.control["Architecture"], "amd64");
    assert!(
        deb.control["Depends"].contains("libc6 (>= 2.17)"),
        "{:?}",
        deb.control
    );

    let modi = deb.path("usr/bin/modi");
    assert_eq!(mode(&modi), 0o755);
    check_portable(&modi);
    // The agent it serves to new hosts: its own version, the same build as
    // the agent package's.
    let served = deb.path("usr/lib/modi/modi-agent");
    assert_eq!(mode(&served), 0o755);
    check_portable(&served);
    let agent = unpack(&artefact(&format!("modi-agent_{v}-1_amd64.deb")));
    assert_eq!(
        std::fs::read(&served).unwrap(),
        std::fs::read(agent.path("usr/bin/modi-agent")).unwrap()
    );

    let unit = deb.unit("modi.service");
    for line in [
        "ExecStart=/usr/bin/modi serve --config /var/lib/modi/controller.toml",
        "User=modi",
        "StateDirectory=modi",
        "StateDirectoryMode=0700",
    ] {
        assert!(
            unit.lines().any(|l| l == line),
            "{line:?} not in the unit:\n{unit}"
        );
    }
    let sysusers = read(&deb.path("usr/lib/sysusers.d/modi.conf"));
    assert!(
        sysusers.lines().any(|l| l.starts_with("u modi ")),
        "{sysusers}"
    );
    let tmpfiles = read(&deb.path("usr/lib/tmpfiles.d/modi.conf"));
    assert!(
        tmpfiles
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>()
                == ["d", "/var/lib/modi", "0700", "modi", "modi", "-"]),
        "{tmpfiles}"
    );
    for doc in [
        "README.md",
        "operations.md",
        "copyright",
        "examples/controller.toml",
    ] {
        let path = deb.path(&format!("usr/share/doc/modi/{doc}"));
        assert_eq!(mode(&path), 0o644, "{doc}");
    }
    // The scripts make the user and the data dir, and do not start the
    // service (it needs `modi init` first).
    assert!(deb.scripts.contains("postinst"), "{}", deb.scripts);
    for needed in [
        "systemd-sysusers modi.conf",
        "systemd-tmpfiles --create modi.conf",
        "adduser --system",
    ] {
        assert!(
            deb.postinst.contains(needed),
            "{needed:?} not in postinst:\n{}",
            deb.postinst
        );
    }
    assert!(
        !deb.postinst.contains("systemctl start"),
        "{}",
        deb.postinst
    );
}

#[test]
fn the_agent_package_has_its_binary_unit_data_dir_and_docs() {
    let v = version();
    let deb = unpack(&artefact(&format!("modi-agent_{v}-1_amd64.deb")));
    assert_eq!(deb.control["Package"], "modi-agent");
    assert_eq!(deb.control["Architecture"], "amd64");
    let agent = deb.path("usr/bin/modi-agent");
    assert_eq!(mode(&agent), 0o755);
    check_portable(&agent);
    let unit = deb.unit("modi-agent.service");
    for line in [
        "ExecStart=/usr/bin/modi-agent run --config /var/lib/modi-agent/agent.toml",
        "User=root",
        "StateDirectory=modi-agent",
        "StateDirectoryMode=0700",
        "RestartPreventExitStatus=77 78",
    ] {
        assert!(
            unit.lines().any(|l| l == line),
            "{line:?} not in the unit:\n{unit}"
        );
    }
    let tmpfiles = read(&deb.path("usr/lib/tmpfiles.d/modi-agent.conf"));
    assert!(
        tmpfiles
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>()
                == ["d", "/var/lib/modi-agent", "0700", "root", "root", "-"]),
        "{tmpfiles}"
    );
    assert_eq!(mode(&deb.path("usr/share/doc/modi-agent/README.md")), 0o644);
    assert!(
        deb.postinst
            .contains("systemd-tmpfiles --create modi-agent.conf"),
        "{}",
        deb.postinst
    );
    assert!(
        !deb.postinst.contains("systemctl start"),
        "{}",
        deb.postinst
    );
}
