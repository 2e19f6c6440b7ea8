//! A plugin thread that sleeps between rounds (`park_timeout`) and is stopped and joined by
//! its owner: the outbox syncer, the CRL watcher. One place for the stop-unpark-join dance.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

/// Tells a background thread's body when to finish.
#[derive(Clone)]
pub struct StopFlag(Arc<AtomicBool>);

impl StopFlag {
    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// A running background thread; dropping it stops and joins it.
pub struct Background {
    stop: StopFlag,
    handle: Option<JoinHandle<()>>,
}

impl Background {
    /// Starts `body` on a thread named `name`. The body should `park_timeout` between rounds
    /// and return soon after the flag is set (it is unparked then).
    pub fn spawn(
        name: &str,
        body: impl FnOnce(StopFlag) + Send + 'static,
    ) -> std::io::Result<Background> {
        let stop = StopFlag(Arc::new(AtomicBool::new(false)));
        let flag = stop.clone();
        let handle = std::thread::Builder::new().name(name.into()).spawn(move || body(flag))?;
        Ok(Background { stop, handle: Some(handle) })
    }

    /// Sets the flag, wakes the thread and joins it. Idempotent.
    pub fn stop(&mut self) {
        self.stop.0.store(true, Ordering::Release);
        if let Some(h) = self.handle.take() {
            h.thread().unpark();
            let _ = h.join();
        }
    }

    /// Whether [`Self::stop`] has joined the thread.
    pub fn is_joined(&self) -> bool {
        self.handle.is_none()
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        self.stop();
    }
}
