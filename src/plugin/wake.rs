//! Waking the broker's main loop from a worker thread.
//!
//! An idle Mosquitto 2.0 sleeps in `epoll_wait(..., 100 ms)` and runs the tick only after it
//! returns, so a backend answer handed over by a worker could wait up to 100 ms. A signal
//! delivered to the broker thread interrupts `epoll_wait` (which is never restarted after a
//! handler, whatever `SA_RESTART` says), the loop goes round, and the tick drains the answer at
//! once. The handler does nothing; `SA_RESTART` keeps every other interrupted syscall transparent.
//! One real-time signal, never used by Mosquitto, is installed while any instance is loaded.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

static USERS: AtomicUsize = AtomicUsize::new(0);

static OLD_ACTION: Mutex<Option<libc::sigaction>> = Mutex::new(None);

extern "C" fn on_signal(_: libc::c_int) {}

fn signo() -> libc::c_int {
    libc::SIGRTMIN() + 7
}

/// Wakes one broker thread; coalesces bursts into one signal per tick.
pub struct Waker {
    main: libc::pthread_t,
    pending: AtomicBool,
    /// `IOTGW_NO_WAKE=1` in the broker's environment turns the signal off (to measure its effect).
    enabled: bool,
}

// SAFETY: pthread_t is a plain thread id; pthread_kill may be called from any thread.
unsafe impl Send for Waker {}
// SAFETY: as above; the only mutable state is atomic.
unsafe impl Sync for Waker {}

impl Waker {
    /// Installs the handler (first instance) and targets the calling thread: call from init,
    /// which runs on the broker thread.
    pub fn install() -> std::io::Result<Waker> {
        if USERS.fetch_add(1, Ordering::SeqCst) == 0 {
            // SAFETY: zeroed sigaction is a valid starting value; we set handler, mask, flags.
            let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
            sa.sa_sigaction = on_signal as *const () as libc::sighandler_t;
            sa.sa_flags = libc::SA_RESTART;
            // SAFETY: valid pointer to a sigset_t inside sa.
            unsafe { libc::sigemptyset(&mut sa.sa_mask) };
            // SAFETY: zeroed sigaction is a valid out-parameter.
            let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
            // SAFETY: valid signal number and pointers.
            if unsafe { libc::sigaction(signo(), &sa, &mut old) } != 0 {
                USERS.fetch_sub(1, Ordering::SeqCst);
                return Err(std::io::Error::last_os_error());
            }
            *OLD_ACTION.lock().unwrap_or_else(|p| p.into_inner()) = Some(old);
        }
        let enabled = std::env::var_os("IOTGW_NO_WAKE").is_none();
        // SAFETY: pthread_self has no preconditions.
        Ok(Waker {
            // SAFETY: pthread_self has no preconditions.
            main: unsafe { libc::pthread_self() },
            pending: AtomicBool::new(false),
            enabled,
        })
    }

    /// Called by workers after queueing a result.
    pub fn wake(&self) {
        if self.enabled && !self.pending.swap(true, Ordering::AcqRel) {
            // SAFETY: `main` is the broker thread, alive until cleanup, which joins every worker
            // before the Waker is dropped.
            unsafe { libc::pthread_kill(self.main, signo()) };
        }
    }

    /// Called by the tick before it drains, so a result queued after this point wakes again.
    pub fn clear(&self) {
        self.pending.store(false, Ordering::Release);
    }
}

impl Drop for Waker {
    fn drop(&mut self) {
        if USERS.fetch_sub(1, Ordering::SeqCst) == 1 {
            if let Some(old) = OLD_ACTION.lock().unwrap_or_else(|p| p.into_inner()).take() {
                // SAFETY: restores the disposition saved at install; our handler's code is about to
                // be unmapped by dlclose, so it must not stay installed.
                unsafe { libc::sigaction(signo(), &old, std::ptr::null_mut()) };
            }
        }
    }
}
