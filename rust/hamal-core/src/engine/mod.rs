//! The transfer engine: plans, the per-disk read/write pipeline, the resume journal, jobs and
//! verification.

pub(crate) mod changed;
mod copy;
mod disk;
mod job;
mod journal;
mod map;
mod plan;
mod pool;
mod progress;
mod throttle;
mod verify;

pub use changed::{parse_changed_json, validate_changed};
pub use disk::DiskSummary;
pub use job::{DiskOutcome, DiskProgressView, Job, JobProgress};
pub use journal::Journal;
pub use map::{map_source, SourceMap};
pub use plan::{ChangedList, DiskPlan, JobPlan, Tuning, MIB};
pub use progress::{DiskState, ProgressSnapshot};
pub use throttle::{release_cpu, Pacer};
pub use verify::{verify, VerifyReport};
