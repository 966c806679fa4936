//! Facts the agent reports about its host in every `Hello`.

use std::collections::BTreeMap;

/// This agent's version.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// hostname, os, arch, kernel, cpus, memory_bytes, agent_version.
pub fn gather() -> BTreeMap<String, String> {
    let mut facts = BTreeMap::new();
    if let Ok(h) = nix::unistd::gethostname() {
        facts.insert("hostname".into(), h.to_string_lossy().into_owned());
    }
    facts.insert("os".into(), os_name());
    facts.insert("arch".into(), std::env::consts::ARCH.into());
    if let Ok(u) = nix::sys::utsname::uname() {
        facts.insert("kernel".into(), u.release().to_string_lossy().into_owned());
    }
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    facts.insert("cpus".into(), cpus.to_string());
    if let Some(mem) = memory_bytes() {
        facts.insert("memory_bytes".into(), mem.to_string());
    }
    facts.insert("agent_version".into(), VERSION.into());
    facts
}

fn os_name() -> String {
    let release = std::fs::read_to_string("/etc/os-release").unwrap_or_default();
    parse_os_release(&release).unwrap_or_else(|| std::env::consts::OS.to_string())
}

fn parse_os_release(text: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map(|v| v.trim_matches('"').to_string())
}

fn memory_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn facts_hold_what_the_controller_shows() {
        let facts = gather();
        for key in [
            "hostname",
            "os",
            "arch",
            "kernel",
            "cpus",
            "memory_bytes",
            "agent_version",
        ] {
            assert!(facts.contains_key(key), "missing {key}: {facts:?}");
        }
        assert!(facts["cpus"].parse::<usize>().unwrap() >= 1);
        assert_eq!(
            parse_os_release("NAME=x\nPRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\n"),
            Some("Debian GNU/Linux 12 (bookworm)".into())
        );
    }
}
