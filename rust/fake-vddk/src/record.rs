//! What the fake is told to do (environment) and what it was asked (the call log).

use std::io::Write;
use std::sync::OnceLock;

/// Faults injected through `FAKE_VDDK_FAIL` (comma-separated): `init`, `connect`, `access`, `open`,
/// `query`, `read:SECTOR`, `abort:SECTOR`, `hang:SECTOR` (that read never returns). A
/// thumbprint other than `FAKE_VDDK_THUMBPRINT` or a password other than `FAKE_VDDK_PASSWORD`
/// (when set) is refused as a real host would.
#[derive(Default)]
pub struct Faults {
    pub init: bool,
    pub connect: bool,
    pub access: bool,
    pub open: bool,
    pub query: bool,
    pub read_at: Option<u64>,
    pub abort_at: Option<u64>,
    pub hang_at: Option<u64>,
}

pub fn faults() -> &'static Faults {
    static F: OnceLock<Faults> = OnceLock::new();
    F.get_or_init(|| {
        let mut f = Faults::default();
        for item in std::env::var("FAKE_VDDK_FAIL")
            .unwrap_or_default()
            .split(',')
        {
            let (name, arg) = item.split_once(':').unwrap_or((item, ""));
            let sector = arg.parse().ok();
            match name.trim() {
                "init" => f.init = true,
                "connect" => f.connect = true,
                "access" => f.access = true,
                "open" => f.open = true,
                "query" => f.query = true,
                "read" => f.read_at = sector,
                "abort" => f.abort_at = sector,
                "hang" => f.hang_at = sector,
                _ => {}
            }
        }
        f
    })
}

pub fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// Appends `pid call args` to `FAKE_VDDK_LOG`, one write per line (several worker processes
/// share the file).
pub fn record(line: &str) {
    let Some(path) = env("FAKE_VDDK_LOG") else {
        return;
    };
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = f.write_all(format!("{} {line}\n", std::process::id()).as_bytes());
    }
}
