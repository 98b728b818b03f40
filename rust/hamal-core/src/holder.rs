//! Who holds a lock: host, boot, pid namespace, pid and the process's start time. On the same
//! host (same boot and pid namespace) a lock whose process is gone, or whose pid now belongs to
//! a younger process, is recognised as dead at once; another host's lock can only age out.

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Holder {
    /// What holds it: "sync", "restore", "prune"...
    #[serde(default)]
    pub kind: String,
    /// What for, in words ("sync of disk vm1-disk0").
    #[serde(default)]
    pub purpose: String,
    #[serde(default)]
    pub host: String,
    #[serde(default)]
    pub boot_id: String,
    #[serde(default)]
    pub pid_ns: String,
    #[serde(default)]
    pub pid: u32,
    /// The process's start time in clock ticks after boot (`/proc/PID/stat` field 22).
    #[serde(default)]
    pub start_ticks: u64,
    /// When the lock was taken (RFC 3339, UTC).
    #[serde(default, alias = "created")]
    pub since: String,
}

/// Whether the holder of a lock is still running, as far as this host can tell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Liveness {
    Alive,
    Dead,
    /// Another host (or an old lock without identity): only its age tells.
    Unknown,
}

fn read_trim(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

pub fn host_name() -> String {
    let h = read_trim("/proc/sys/kernel/hostname");
    if h.is_empty() {
        "unknown".into()
    } else {
        h
    }
}

fn pid_namespace() -> String {
    std::fs::read_link("/proc/self/ns/pid")
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Start time of process `pid` in clock ticks after boot, `None` when there is no such process
/// or it has exited (a zombie no one reaped yet: an init that does not reap, a dead parent).
pub fn start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count from the last ')'.
    let mut fields = stat[stat.rfind(')')? + 1..].split_whitespace();
    if matches!(fields.next(), Some("Z" | "X" | "x")) {
        return None;
    }
    fields.nth(18)?.parse().ok()
}

impl Holder {
    /// This process, taking a lock of `kind` for `purpose`.
    pub fn me(kind: &str, purpose: &str) -> Holder {
        let pid = std::process::id();
        Holder {
            kind: kind.into(),
            purpose: purpose.into(),
            host: host_name(),
            boot_id: read_trim("/proc/sys/kernel/random/boot_id"),
            pid_ns: pid_namespace(),
            pid,
            start_ticks: start_ticks(pid).unwrap_or(0),
            since: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        }
    }

    /// A holder known only by its pid on this host (from `/proc/locks`).
    pub fn local_pid(pid: u32, kind: &str) -> Holder {
        let mut h = Holder::me(kind, "");
        h.pid = pid;
        h.start_ticks = start_ticks(pid).unwrap_or(0);
        h.since = process_started(h.start_ticks).unwrap_or_default();
        h
    }

    /// Whether the holder still runs; only answerable on the host (boot and pid namespace) that
    /// wrote it.
    pub fn liveness(&self) -> Liveness {
        let me = Holder::me("", "");
        if self.boot_id.is_empty() || self.boot_id != me.boot_id || self.pid_ns != me.pid_ns {
            return Liveness::Unknown;
        }
        match start_ticks(self.pid) {
            Some(t) if t == self.start_ticks => Liveness::Alive,
            _ => Liveness::Dead,
        }
    }

    /// "a sync of disk d0 (pid 42 on host h, since 2026-11-30T05:00:00Z)".
    pub fn describe(&self) -> String {
        let what = match (self.kind.as_str(), self.purpose.as_str()) {
            ("", "") => "another process".to_owned(),
            (k, "") => format!("a {k}"),
            (_, p) => format!("a {p}"),
        };
        let since = if self.since.is_empty() {
            String::new()
        } else {
            format!(", since {}", self.since)
        };
        format!("{what} (pid {} on host {}{since})", self.pid, self.host)
    }
}

/// Wall-clock start of a process that started `ticks` after boot (RFC 3339).
fn process_started(ticks: u64) -> Option<String> {
    let uptime: f64 = read_trim("/proc/uptime")
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let age = (uptime - ticks as f64 / hz).max(0.0);
    let at = chrono::Utc::now() - chrono::Duration::milliseconds((age * 1000.0) as i64);
    Some(at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_is_alive_and_a_dead_pid_is_dead() {
        let me = Holder::me("sync", "sync of disk d");
        assert!(me.start_ticks > 0);
        assert_eq!(me.liveness(), Liveness::Alive);
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        let gone = Holder { pid, ..me.clone() };
        assert_eq!(gone.liveness(), Liveness::Dead);
        let reused = Holder {
            start_ticks: me.start_ticks + 1,
            ..me.clone()
        };
        assert_eq!(
            reused.liveness(),
            Liveness::Dead,
            "a younger process with our pid"
        );
        let elsewhere = Holder {
            boot_id: "another boot".into(),
            ..me.clone()
        };
        assert_eq!(elsewhere.liveness(), Liveness::Unknown);
        assert!(me.describe().starts_with("a sync of disk d (pid "));
    }

    #[test]
    fn an_exited_process_not_yet_reaped_is_dead() {
        let me = Holder::me("sync", "sync of disk d");
        let mut child = std::process::Command::new("sleep")
            .arg("0.1")
            .spawn()
            .unwrap();
        let pid = child.id();
        let holder = Holder {
            pid,
            start_ticks: start_ticks(pid).unwrap(),
            ..me
        };
        assert_eq!(holder.liveness(), Liveness::Alive);
        let zombie = || {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
            stat[stat.rfind(')').unwrap() + 1..]
                .trim_start()
                .starts_with('Z')
        };
        while !zombie() {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(holder.liveness(), Liveness::Dead, "a zombie holds nothing");
        child.wait().unwrap();
    }
}
