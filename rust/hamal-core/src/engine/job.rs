//! A job: several disk plans run on the engine's own threads, `parallel_disks` at a time.
//! The caller keeps a [`Job`] handle to poll progress, wait with a timeout, or cancel.

use super::disk::{run_disk, DiskRun, DiskSummary};
use super::plan::JobPlan;
use super::progress::{DiskProgress, DiskState, ProgressSnapshot};
use super::throttle::Pacer;
use crate::{Error, Result};
use serde::Serialize;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

pub type DiskOutcome = std::result::Result<DiskSummary, Arc<Error>>;

struct Shared {
    plan: JobPlan,
    progress: Vec<DiskProgress>,
    outcomes: Mutex<Vec<Option<DiskOutcome>>>,
    cancel: Arc<AtomicBool>,
    finished: Mutex<bool>,
    finished_cv: Condvar,
}

pub struct Job {
    shared: Arc<Shared>,
}

#[derive(Clone, Debug, Serialize)]
pub struct DiskProgressView {
    pub disk_id: String,
    pub state: DiskState,
    #[serde(flatten)]
    pub progress: ProgressSnapshot,
}

#[derive(Clone, Debug, Serialize)]
pub struct JobProgress {
    pub finished: bool,
    #[serde(flatten)]
    pub total: ProgressSnapshot,
    pub disks: Vec<DiskProgressView>,
}

impl Job {
    /// Validates the plan and starts it on background threads.
    pub fn start(plan: JobPlan) -> Result<Job> {
        plan.validate()?;
        let n = plan.disks.len();
        let shared = Arc::new(Shared {
            progress: (0..n).map(|_| DiskProgress::default()).collect(),
            outcomes: Mutex::new(vec![None; n]),
            cancel: Arc::new(AtomicBool::new(false)),
            finished: Mutex::new(false),
            finished_cv: Condvar::new(),
            plan,
        });
        let s = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("hamal-job".into())
            .spawn(move || run_job(&s))
            .map_err(|e| Error::Plan(format!("cannot start job thread: {e}")))?;
        Ok(Job { shared })
    }

    pub fn progress(&self) -> JobProgress {
        let s = &self.shared;
        let mut total = ProgressSnapshot::default();
        let disks = s
            .plan
            .disks
            .iter()
            .zip(&s.progress)
            .map(|(d, p)| {
                let snap = p.snapshot();
                total.add(&snap);
                DiskProgressView {
                    disk_id: d.disk_id.clone(),
                    state: p.state(),
                    progress: snap,
                }
            })
            .collect();
        total.finish_rates();
        JobProgress {
            finished: self.is_finished(),
            total,
            disks,
        }
    }

    pub fn is_finished(&self) -> bool {
        *self.shared.finished.lock().unwrap()
    }

    /// Waits until every disk is finished; `false` if `timeout` passed first.
    pub fn wait(&self, timeout: Option<Duration>) -> bool {
        let s = &self.shared;
        let guard = s.finished.lock().unwrap();
        match timeout {
            None => *s.finished_cv.wait_while(guard, |f| !*f).unwrap(),
            Some(t) => {
                *s.finished_cv
                    .wait_timeout_while(guard, t, |f| !*f)
                    .unwrap()
                    .0
            }
        }
    }

    /// Asks every disk to stop; finished chunks stay journaled for a resume.
    pub fn cancel(&self) {
        self.shared.cancel.store(true, Relaxed);
    }

    /// Per-disk outcomes, in plan order (`None` for a disk not finished yet).
    pub fn outcomes(&self) -> Vec<Option<DiskOutcome>> {
        self.shared.outcomes.lock().unwrap().clone()
    }

    /// Runs a plan to the end on the calling thread's behalf.
    pub fn run(plan: JobPlan) -> Result<Vec<DiskOutcome>> {
        let job = Job::start(plan)?;
        job.wait(None);
        Ok(job
            .outcomes()
            .into_iter()
            .map(|o| o.expect("finished job has every outcome"))
            .collect())
    }
}

fn run_job(s: &Shared) {
    let t = &s.plan.tuning;
    let n = s.plan.disks.len();
    let lanes = (t.parallel_disks as usize).min(n);
    let budget = t.memory_budget / lanes as u64;
    let pacer = Pacer::new(t.bwlimit_bps);
    let next = AtomicUsize::new(0);
    std::thread::scope(|scope| {
        for _ in 0..lanes {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Relaxed);
                if i >= n {
                    return;
                }
                let run = DiskRun {
                    plan: &s.plan.disks[i],
                    tuning: t,
                    progress: &s.progress[i],
                    cancel: &s.cancel,
                    pacer: &pacer,
                    memory_budget: budget,
                };
                let out = if s.cancel.load(Relaxed) {
                    s.progress[i].set_state(DiskState::Cancelled);
                    Err(Error::Cancelled)
                } else {
                    // A panic in one disk fails that disk, not the job or the process.
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_disk(run)))
                        .unwrap_or_else(|p| Err(Error::Internal(panic_text(&p))))
                };
                s.outcomes.lock().unwrap()[i] = Some(out.map_err(Arc::new));
            });
        }
    });
    *s.finished.lock().unwrap() = true;
    s.finished_cv.notify_all();
}

fn panic_text(p: &Box<dyn std::any::Any + Send>) -> String {
    let msg = p
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()));
    format!("internal error: {}", msg.unwrap_or_else(|| "panic".into()))
}
