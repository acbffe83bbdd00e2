//! Connection threads, kept warm: a finished connection's thread waits a
//! while for the next one instead of exiting, which saves a thread creation
//! (and its stack mapping) on every request of a busy client.

use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

type Job = Box<dyn FnOnce() + Send>;

/// Idle threads kept waiting for work at most.
const KEEP_IDLE: usize = 32;
/// An idle thread exits after this long without work.
const IDLE_EXIT: Duration = Duration::from_secs(10);

struct State {
    jobs: VecDeque<Job>,
    idle: usize,
}

struct Inner {
    state: Mutex<State>,
    work: Condvar,
    stack: usize,
}

/// A grow-on-demand thread pool: a job never waits for a busy thread.
#[derive(Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

impl Pool {
    pub fn new(stack: usize) -> Self {
        let state = Mutex::new(State {
            jobs: VecDeque::new(),
            idle: 0,
        });
        Pool {
            inner: Arc::new(Inner {
                state,
                work: Condvar::new(),
                stack,
            }),
        }
    }

    /// Runs `job` on an idle thread, or on a new one if none is idle.
    pub fn execute(&self, job: impl FnOnce() + Send + 'static) -> io::Result<()> {
        let mut st = self.inner.lock();
        if st.idle > st.jobs.len() {
            st.jobs.push_back(Box::new(job));
            drop(st);
            self.inner.work.notify_one();
            return Ok(());
        }
        drop(st);
        let inner = self.inner.clone();
        std::thread::Builder::new()
            .stack_size(self.inner.stack)
            .spawn(move || {
                job();
                inner.worker();
            })?;
        Ok(())
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn worker(&self) {
        loop {
            let job = {
                let mut st = self.lock();
                loop {
                    if let Some(j) = st.jobs.pop_front() {
                        break j;
                    }
                    if st.idle >= KEEP_IDLE {
                        return;
                    }
                    st.idle += 1;
                    let (g, wait) = self
                        .work
                        .wait_timeout(st, IDLE_EXIT)
                        .unwrap_or_else(|e| e.into_inner());
                    st = g;
                    st.idle -= 1;
                    if wait.timed_out() && st.jobs.is_empty() {
                        return;
                    }
                }
            };
            job();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn runs_every_job_and_reuses_threads() {
        let pool = Pool::new(64 * 1024);
        let done = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = std::sync::mpsc::channel();
        for _ in 0..200 {
            let done = done.clone();
            let tx = tx.clone();
            pool.execute(move || {
                done.fetch_add(1, Ordering::SeqCst);
                tx.send(std::thread::current().id()).unwrap();
            })
            .unwrap();
            // Give the worker time to go idle so the next job reuses it.
            std::thread::sleep(Duration::from_micros(200));
        }
        let ids: std::collections::HashSet<_> = (0..200).map(|_| rx.recv().unwrap()).collect();
        assert_eq!(done.load(Ordering::SeqCst), 200);
        assert!(ids.len() < 200, "threads were reused");
    }

    #[test]
    fn blocked_jobs_do_not_block_new_ones() {
        let pool = Pool::new(64 * 1024);
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let rx = Arc::new(Mutex::new(rx));
        for _ in 0..4 {
            let rx = rx.clone();
            pool.execute(move || {
                let _ = rx.lock().unwrap().recv_timeout(Duration::from_secs(5));
            })
            .unwrap();
        }
        let (dtx, drx) = std::sync::mpsc::channel();
        pool.execute(move || dtx.send(()).unwrap()).unwrap();
        drx.recv_timeout(Duration::from_secs(2))
            .expect("a new job runs while others block");
        drop(tx);
    }
}
