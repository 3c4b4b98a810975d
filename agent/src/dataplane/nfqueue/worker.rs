//! The netfilter worker: the one thread that runs every iptables call of the mechanism, in order.

use std::io;
use std::sync::mpsc;
use std::thread::JoinHandle;

use super::error::NfqueueError;

type Job = Box<dyn FnOnce() + Send>;

/// One thread runs every iptables call in order, so a removal queued in the background is done
/// before the next fault's rules are computed.
pub(super) struct Worker {
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    pub(super) fn start() -> io::Result<Worker> {
        let (jobs, inbox) = mpsc::channel::<Job>();
        let thread = std::thread::Builder::new()
            .name("faultd-netfilter".into())
            .spawn(move || {
                for job in inbox {
                    job();
                }
            })?;
        Ok(Worker {
            jobs: Some(jobs),
            thread: Some(thread),
        })
    }

    pub(super) fn spawn(&self, job: impl FnOnce() + Send + 'static) {
        let sent = self.jobs.as_ref().map(|jobs| jobs.send(Box::new(job)));
        if !matches!(sent, Some(Ok(()))) {
            tracing::error!("the netfilter worker is gone; a clean-up was skipped");
        }
    }

    /// Runs `job` after everything queued before it and returns its result.
    pub(super) fn call<T: Send + 'static>(
        &self,
        job: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, NfqueueError> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.spawn(move || {
            let _caller_gone = tx.send(job());
        });
        rx.recv().map_err(|_| NfqueueError::WorkerGone)
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.jobs.take();
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::error!("the netfilter worker panicked");
        }
    }
}
