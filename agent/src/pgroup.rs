//! The process groups steps run in: what the journal records about one, and
//! how an agent that restarts kills the ones its previous life left
//! running.
//!
//! Every step's process is spawned as the leader of a process group of its
//! own, so its pid is the group's id (pgid). A pid alone could have been
//! reused by the time the agent restarts, so the record also holds the
//! leader's start time (`/proc/<pid>/stat` field 22, clock ticks since
//! boot) and the kernel's boot id. A group is only ever signalled when
//! those say it is still the step's:
//! - another boot id: the host restarted, the group died with it;
//! - the leader's pid alive with another start time: the pid was reused,
//!   which Linux only does once nothing uses it as a pgid any more, so the
//!   group is gone;
//! - otherwise the group's live members (every process whose `/proc` stat
//!   names the pgid, not a zombie, started no earlier than the leader) are
//!   what is left of it.
//!
//! The orphans are no longer the agent's children, so they cannot be
//! waited for: `/proc` is polled until none is left. A zombie counts as
//! dead. A process the step moved to a group of its own (`setsid`, a
//! daemon) is outside its group and is not found. Linux only.

use std::fs;
use std::io;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

/// How long a restarting agent waits for killed groups to be gone.
pub const KILL_WAIT: Duration = Duration::from_secs(5);
/// How often `/proc` is looked at while waiting.
const POLL: Duration = Duration::from_millis(20);

/// A step's process group as the journal records it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Group {
    /// The group id: its leader's pid.
    pub pgid: i32,
    /// The leader's start time, clock ticks after boot.
    pub start_time: u64,
    /// The kernel's boot id when it was recorded; empty if unknown.
    pub boot_id: String,
}

/// The fields of `/proc/<pid>/stat` used here.
#[derive(Debug, PartialEq)]
struct Stat {
    /// Field 3: `R`, `S`, `Z`...
    state: char,
    /// Field 5.
    pgrp: i32,
    /// Field 22.
    start_time: u64,
}

fn parse_stat(text: &str) -> Option<Stat> {
    // Field 2, the command name in parentheses, may hold spaces and
    // parentheses itself: the numbered fields are those after the last `)`.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is field 3.
    Some(Stat {
        state: fields.first()?.chars().next()?,
        pgrp: fields.get(2)?.parse().ok()?,
        start_time: fields.get(19)?.parse().ok()?,
    })
}

fn stat(pid: i32) -> io::Result<Stat> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    parse_stat(&text).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("cannot parse /proc/{pid}/stat"),
        )
    })
}

fn boot_id() -> String {
    fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

impl Group {
    /// The group led by `pid`, a process just spawned as a group leader
    /// (and not yet waited for, so its `/proc` entry is there).
    pub fn led_by(pid: u32) -> io::Result<Group> {
        let pgid = i32::try_from(pid).map_err(io::Error::other)?;
        let stat = stat(pgid)?;
        if stat.pgrp != pgid {
            return Err(io::Error::other(format!(
                "process {pid} is not a process group leader (its group is {})",
                stat.pgrp
            )));
        }
        Ok(Group {
            pgid,
            start_time: stat.start_time,
            boot_id: boot_id(),
        })
    }

    /// The record's text.
    pub fn encode(&self) -> String {
        format!(
            "pgid {}\nstart_time {}\nboot_id {}\n",
            self.pgid, self.start_time, self.boot_id
        )
    }

    /// Reads a record written by [`Group::encode`].
    pub fn decode(text: &str) -> Option<Group> {
        let (mut pgid, mut start_time, mut boot) = (None, None, String::new());
        for line in text.lines() {
            let (key, value) = line.split_once(' ').unwrap_or((line, ""));
            match key {
                "pgid" => pgid = value.parse::<i32>().ok().filter(|p| *p > 1),
                "start_time" => start_time = value.parse().ok(),
                "boot_id" => boot = value.to_string(),
                _ => {}
            }
        }
        Some(Group {
            pgid: pgid?,
            start_time: start_time?,
            boot_id: boot,
        })
    }

    /// Why this group cannot be running any more, or `None` if it may be.
    fn ended(&self) -> Option<&'static str> {
        let now = boot_id();
        if !self.boot_id.is_empty() && !now.is_empty() && now != self.boot_id {
            return Some("the host restarted since");
        }
        match stat(self.pgid) {
            Ok(leader) if leader.start_time != self.start_time => {
                Some("its pid now belongs to another process")
            }
            _ => None,
        }
    }

    /// The live processes of this group (not zombies, started no earlier
    /// than its leader), pids ascending.
    pub fn members(&self) -> Vec<i32> {
        let Ok(entries) = fs::read_dir("/proc") else {
            return Vec::new();
        };
        let mut pids: Vec<i32> = entries
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
            .filter(|pid| {
                // A process that ends while being looked at is not a member.
                stat(*pid).is_ok_and(|s| {
                    s.pgrp == self.pgid && s.state != 'Z' && s.start_time >= self.start_time
                })
            })
            .collect();
        pids.sort_unstable();
        pids
    }
}

/// The environment variable every step's process (and all it starts)
/// carries: its dispatch id. It finds a step whose process group the
/// agent died before recording.
pub const DISPATCH_ENV: &str = "MODI_DISPATCH_ID";

/// The process groups of live processes whose environment carries
/// `MODI_DISPATCH_ID=<id>`.
pub fn marked(id: &str) -> Vec<i32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let needle = format!("{DISPATCH_ENV}={id}");
    let mut pgids: Vec<i32> = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|env| env.split(|b| *b == 0).any(|v| v == needle.as_bytes()))
        })
        .filter_map(|pid| stat(pid).ok().filter(|s| s.state != 'Z').map(|s| s.pgrp))
        .collect();
    pgids.sort_unstable();
    pgids.dedup();
    pgids
}

/// Kills the groups of every process marked with dispatch `id` (see
/// [`marked`]) and waits, at most `wait`, until none is left. Returns how
/// many groups were killed, or the pids still alive.
pub fn kill_marked(id: &str, wait: Duration) -> Result<usize, Vec<i32>> {
    let first = marked(id);
    let deadline = Instant::now() + wait;
    loop {
        let left = marked(id);
        if left.is_empty() {
            return Ok(first.len());
        }
        if Instant::now() >= deadline {
            return Err(left);
        }
        for pgid in left {
            let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
        }
        std::thread::sleep(POLL);
    }
}

/// What a restarting agent did about one recorded group.
#[derive(Debug, PartialEq)]
pub enum Fate {
    /// Nothing of it was left to kill; why it is known to be over.
    Ended(&'static str),
    /// It was running: killed, and none of it is left.
    Killed,
    /// It is running and SIGKILL could not be sent.
    KillFailed(String),
    /// SIGKILL was sent, but these processes were still alive after
    /// [`KILL_WAIT`].
    Survived(Vec<i32>),
}

/// Kills whatever is left of each group, then waits (at most `wait`) until
/// none of them has a live process. Returns each group's fate, in order.
pub fn kill_all(groups: &[Group], wait: Duration) -> Vec<Fate> {
    let mut fates: Vec<Option<Fate>> = groups
        .iter()
        .map(|g| {
            if let Some(why) = g.ended() {
                return Some(Fate::Ended(why));
            }
            if g.members().is_empty() {
                return Some(Fate::Ended("no process of it was left"));
            }
            match killpg(Pid::from_raw(g.pgid), Signal::SIGKILL) {
                // ESRCH: it ended between the look and the kill.
                Ok(()) | Err(Errno::ESRCH) => None,
                Err(e) => Some(Fate::KillFailed(e.to_string())),
            }
        })
        .collect();
    let deadline = Instant::now() + wait;
    loop {
        let mut waiting = false;
        for (g, fate) in groups.iter().zip(fates.iter_mut()) {
            if fate.is_some() {
                continue;
            }
            let left = g.members();
            if left.is_empty() {
                *fate = Some(Fate::Killed);
            } else if Instant::now() >= deadline {
                *fate = Some(Fate::Survived(left));
            } else {
                // A process forked as the first kill went out is caught
                // by the next.
                let _ = killpg(Pid::from_raw(g.pgid), Signal::SIGKILL);
                waiting = true;
            }
        }
        if !waiting {
            break;
        }
        std::thread::sleep(POLL);
    }
    fates
        .into_iter()
        .map(|f| f.expect("every group has a fate"))
        .collect()
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::CommandExt;

    use super::*;

    #[test]
    fn a_step_whose_group_was_never_recorded_is_found_by_its_mark_and_killed() {
        let mut child = std::process::Command::new("sh")
            .args(["-c", "sleep 30 & sleep 30; wait"])
            .env(DISPATCH_ENV, "r9-1.c0.h0.apply.0.a0")
            .process_group(0)
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while marked("r9-1.c0.h0.apply.0.a0").is_empty() {
            assert!(Instant::now() < deadline, "the marked step is seen");
            std::thread::sleep(POLL);
        }
        assert_eq!(
            marked("r9-1.c0.h0.apply.0.a"),
            Vec::<i32>::new(),
            "exact id only"
        );
        assert_eq!(kill_marked("r9-1.c0.h0.apply.0.a0", KILL_WAIT), Ok(1));
        let status = child.wait().unwrap();
        assert!(!status.success());
        assert!(marked("r9-1.c0.h0.apply.0.a0").is_empty());
    }

    #[test]
    fn stat_fields_come_after_the_last_parenthesis() {
        let text =
            "4242 (a) b (c) S 1 4240 4240 0 -1 4194560 100 0 0 0 0 0 0 0 20 0 1 0 987654 1 2 3\n";
        assert_eq!(
            parse_stat(text),
            Some(Stat {
                state: 'S',
                pgrp: 4240,
                start_time: 987654
            })
        );
        assert_eq!(parse_stat("4242 (cut"), None);
    }

    #[test]
    fn a_record_reads_back() {
        let g = Group {
            pgid: 4242,
            start_time: 987654,
            boot_id: "0b8e2c6a-1d3f-4c5e-9a7b-2f4d6e8a0c1e".into(),
        };
        assert_eq!(Group::decode(&g.encode()), Some(g));
        assert_eq!(Group::decode("pgid 1\nstart_time 5\n"), None, "never init");
        assert_eq!(Group::decode("garbage"), None);
    }

    #[test]
    fn our_own_group_leader_is_seen_with_its_start_time() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .process_group(0)
            .spawn()
            .unwrap();
        let g = Group::led_by(child.id()).unwrap();
        assert_eq!(g.pgid, child.id() as i32);
        assert_eq!(g.ended(), None);
        assert_eq!(g.members(), vec![g.pgid]);
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(g.members().is_empty());
    }
}
