//! The plugin's own clock: it makes the broker run our tick when we need it, on every Mosquitto.
//!
//! The broker's idea of when to tick differs between versions:
//! - 2.0.x sleeps in `epoll_wait(..., 100 ms)` and ticks at the *end* of each pass; a publish from
//!   the tick goes out at the top of the next pass, at once.
//! - 2.1.x ticks *before* the network wait, and a publish from the tick goes out only at the top of
//!   the *next* pass; that wait is a fixed 100 ms with websockets compiled in, and up to 24 h
//!   without them (it only shrinks for `next_ms` set by a tick, and a skipped tick does not
//!   reschedule itself). An idle 2.1 broker may thus never tick again on its own.
//!
//! So nothing here relies on the broker's wait. A real-time signal sent to the broker thread
//! interrupts `epoll_wait`/`poll` (never restarted after a handler, whatever `SA_RESTART` says)
//! and the loop goes round. A signal that lands while the broker is *not* waiting is simply
//! absorbed, so one signal is not enough: a [`Waker::request`] means "a tick must *start* after
//! this point", and the kicker thread repeats the signal every [`KICK_EVERY`] until the tick
//! counter ([`Waker::tick_started`]) moves past the request. Requests come from:
//! - workers, when a result is queued (the tick drains it);
//! - the tick itself, after it published (2.1: only the next pass sends it);
//! - the kicker's own period, when no tick ran for [`PERIOD`] (registry snapshots, refilling the
//!   lanes, pruning, stats), so housekeeping runs on every version, idle or not.
//!
//! `SA_RESTART` keeps every other interrupted syscall of the broker transparent. One real-time
//! signal, never used by Mosquitto, is installed while any instance is loaded.
//!
//! A tick that nobody asked for does no work unless [`FULL_TICK_EVERY`] has passed since the last
//! one that did: a busy 2.x broker ticks once per pass of its loop, which is once or twice per
//! message, and the gateway's tick (draining channels, reading clocks, timers) cost ~1 µs each time
//! (`perf` of `make bench`). Anything a thread queues for the tick comes with a request, which
//! makes the next tick a full one (see [`Waker::tick_started`]).
//!
//! Under a stream of results (forwarding at thousands of messages a second) nearly every result
//! is a new request, since the busy broker ticks between them. Signals are therefore sent at most
//! once per [`KICK_EVERY`], whoever asks, and a worker wakes the kicker only when it is not already
//! polling: a signal per result plus one from the kicker cost the broker thread a signal
//! delivery each and the kicker ~10 µs per message (`make bench`, BENCHMARKS.md). Nor is a broker
//! signalled that started a tick less than [`KICK_EVERY`] ago: it is going round its loop and
//! will tick again by itself; if it went to sleep instead, the kicker signals it within another
//! [`KICK_EVERY`]. A request made after a quiet spell is still signalled at once.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Housekeeping period: the longest the broker goes without our tick (2.0's idle tick rate).
pub const PERIOD: Duration = Duration::from_millis(100);
/// The longest a busy broker goes without a full tick when nothing asked for one (timers: log
/// flushes, `$SYS`, metrics snapshots, the CRL file).
pub const FULL_TICK_EVERY: Duration = Duration::from_millis(1);
/// Re-send interval while a requested tick has not started yet.
pub const KICK_EVERY: Duration = Duration::from_micros(200);
/// The kicker keeps polling this long after the last request, so that a stream of requests (one
/// per tick while forwarding) does not wake it through the condition variable each time.
const LINGER: Duration = Duration::from_millis(10);
/// Kicking at full rate stops after this long without a tick (e.g. 2.0.11 never ticks with
/// `per_listener_settings true`); it then continues at [`PERIOD`].
const KICK_GIVE_UP: Duration = Duration::from_millis(20);

static USERS: AtomicUsize = AtomicUsize::new(0);

static OLD_ACTION: Mutex<Option<libc::sigaction>> = Mutex::new(None);

extern "C" fn on_signal(_: libc::c_int) {}

fn signo() -> libc::c_int {
    libc::SIGRTMIN() + 7
}

struct Shared {
    main: libc::pthread_t,
    /// Ticks started so far.
    ticks: AtomicU64,
    /// A tick numbered above this is owed (`ticks < owed` means a request is outstanding).
    owed: AtomicU64,
    /// Nanoseconds since `epoch` at the last tick start.
    last_tick_ns: AtomicU64,
    /// Something was queued for the tick since the last full one (set before `owed` moves).
    pending: AtomicBool,
    /// Nanoseconds since `epoch` at the start of the last full tick (broker thread only).
    last_full_ns: AtomicU64,
    epoch: Instant,
    stop: AtomicBool,
    lock: Mutex<()>,
    cv: Condvar,
    /// Nanoseconds since `epoch` when the last signal was sent.
    last_kick_ns: AtomicU64,
    /// Nanoseconds since `epoch` of the last new request.
    last_request_ns: AtomicU64,
    /// The kicker is polling at the fast rate (it checks `owing` within [`KICK_EVERY`], so a
    /// request need not wake it).
    polling: AtomicBool,
    /// `IOTGW_NO_WAKE=1` turns the signal off (to measure its effect).
    enabled: bool,
}

// SAFETY: pthread_t is a plain thread id; pthread_kill may be called from any thread. Everything
// else is atomics and std sync types.
unsafe impl Send for Shared {}
// SAFETY: as above.
unsafe impl Sync for Shared {}

impl Shared {
    fn new(main: libc::pthread_t) -> Shared {
        Shared {
            main,
            ticks: AtomicU64::new(0),
            owed: AtomicU64::new(0),
            last_tick_ns: AtomicU64::new(0),
            pending: AtomicBool::new(false),
            last_full_ns: AtomicU64::new(0),
            last_kick_ns: AtomicU64::new(0),
            last_request_ns: AtomicU64::new(0),
            polling: AtomicBool::new(false),
            epoch: Instant::now(),
            stop: AtomicBool::new(false),
            lock: Mutex::new(()),
            cv: Condvar::new(),
            enabled: std::env::var_os("IOTGW_NO_WAKE").is_none(),
        }
    }

    /// Signals the broker thread unless a signal went out, or a tick started, less than
    /// [`KICK_EVERY`] ago. A broker that ticked that recently is going round its loop and ticks
    /// again on its own (a busy 2.x ticks every pass); a signal would only interrupt it, at a
    /// few µs of its thread each (`make bench`, forwarding). The kicker looks again within
    /// [`KICK_EVERY`], so a broker that went to sleep right after its tick is signalled then.
    fn kick(&self) {
        let now = self.since_epoch().max(1);
        let ticked = self.last_tick_ns.load(Ordering::Acquire);
        if ticked != 0 && now.saturating_sub(ticked) < KICK_EVERY.as_nanos() as u64 {
            return;
        }
        let last = self.last_kick_ns.load(Ordering::Acquire);
        if last != 0 && now.saturating_sub(last) < KICK_EVERY.as_nanos() as u64 {
            return;
        }
        if self
            .last_kick_ns
            .compare_exchange(last, now, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return; // another thread is signalling right now
        }
        if self.enabled {
            // SAFETY: `main` is the broker thread, alive until cleanup, which stops the kicker and
            // joins every worker before the Waker is dropped.
            unsafe { libc::pthread_kill(self.main, signo()) };
        }
    }

    fn tick_started(&self) -> bool {
        let now = self.since_epoch().max(1);
        self.last_tick_ns.store(now, Ordering::Release);
        // Counted before the flag is taken (SeqCst, as in `request`).
        self.ticks.fetch_add(1, Ordering::SeqCst);
        let asked = self.pending.swap(false, Ordering::SeqCst);
        let last = self.last_full_ns.load(Ordering::Relaxed);
        let due = asked || last == 0 || now - last >= FULL_TICK_EVERY.as_nanos() as u64;
        if due {
            self.last_full_ns.store(now, Ordering::Relaxed);
        }
        due
    }

    fn since_epoch(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    fn owing(&self) -> bool {
        // SeqCst: pairs with `request`'s store of `owed` and load of `polling` (see `run`).
        self.ticks.load(Ordering::SeqCst) < self.owed.load(Ordering::SeqCst)
    }

    fn run(&self) {
        let mut g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        while !self.stop.load(Ordering::Acquire) {
            if self.owing() {
                // Kick until the tick starts; give up the fast rate if the broker stops ticking.
                // "Stops ticking": no tick started (and something was owed all along) for
                // KICK_GIVE_UP. Not "is owed a tick for a while": under a stream of results a new
                // request is owed before the last one is served, tick after tick, and reading
                // that as a broker that never ticks left the kicker at PERIOD and a backlog drain
                // waiting up to 100 ms for each refill (BENCHMARKS.md).
                let mut since = Instant::now();
                self.polling.store(true, Ordering::SeqCst);
                let lingering = || {
                    let last = self.last_request_ns.load(Ordering::Acquire);
                    self.since_epoch().saturating_sub(last) < LINGER.as_nanos() as u64
                };
                while (self.owing() || lingering()) && !self.stop.load(Ordering::Acquire) {
                    if self.owing() {
                        self.kick();
                    } else {
                        since = Instant::now();
                    }
                    let ticked = Duration::from_nanos(
                        self.since_epoch()
                            .saturating_sub(self.last_tick_ns.load(Ordering::Acquire)),
                    );
                    let quiet = since.elapsed().min(ticked);
                    let wait = if quiet < KICK_GIVE_UP { KICK_EVERY } else { PERIOD };
                    g = self.cv.wait_timeout(g, wait).unwrap_or_else(|p| p.into_inner()).0;
                }
                // A request that saw `polling` still set was not notified: the loop above goes
                // round again if one came in (SeqCst on both sides: one of us sees the other).
                self.polling.store(false, Ordering::SeqCst);
                continue;
            }
            let idle = Duration::from_nanos(
                self.since_epoch().saturating_sub(self.last_tick_ns.load(Ordering::Acquire)),
            );
            if idle >= PERIOD {
                // Not request(): that takes the lock this thread already holds.
                self.owed.fetch_max(self.ticks.load(Ordering::Acquire) + 1, Ordering::AcqRel);
                continue;
            }
            g = self.cv.wait_timeout(g, PERIOD - idle).unwrap_or_else(|p| p.into_inner()).0;
        }
    }

    /// Tells the kicker to end; it returns from [`Shared::run`] at once.
    fn halt(&self) {
        self.stop.store(true, Ordering::Release);
        drop(self.lock.lock().unwrap_or_else(|p| p.into_inner()));
        self.cv.notify_all();
    }

    fn request(&self, kick_now: bool) {
        // Before `ticks` is read (SeqCst, as in `tick_started`): a tick that misses this flag
        // counted itself before we read `ticks`, so the tick we ask for is a later one, which
        // sees the flag.
        self.pending.store(true, Ordering::SeqCst);
        let want = self.ticks.load(Ordering::Acquire) + 1;
        if self.owed.fetch_max(want, Ordering::SeqCst) < want {
            self.last_request_ns.store(self.since_epoch(), Ordering::Release);
            if kick_now {
                // The first signal straight from the caller saves the kicker's wake-up time.
                self.kick();
            }
            if self.polling.load(Ordering::SeqCst) {
                return; // the kicker looks at `owing` again within KICK_EVERY
            }
            // Lock so the notification cannot slip between the kicker's check and its wait.
            drop(self.lock.lock().unwrap_or_else(|p| p.into_inner()));
            self.cv.notify_one();
        }
    }
}

/// Wakes one broker thread on request and on the plugin's own period; owns the kicker thread.
pub struct Waker {
    shared: Arc<Shared>,
    kicker: Mutex<Option<JoinHandle<()>>>,
}

impl Waker {
    /// Installs the handler (first instance), targets the calling thread and starts the kicker:
    /// call from init, which runs on the broker thread.
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
        // SAFETY: pthread_self has no preconditions.
        let shared = Arc::new(Shared::new(unsafe { libc::pthread_self() }));
        let s = shared.clone();
        let kicker = std::thread::Builder::new().name("iotgw-clock".into()).spawn(move || s.run());
        match kicker {
            // The Waker's Drop releases the handler if the thread could not start.
            Ok(h) => Ok(Waker { shared, kicker: Mutex::new(Some(h)) }),
            Err(e) => {
                drop(Waker { shared, kicker: Mutex::new(None) });
                Err(e)
            }
        }
    }

    /// From a worker: asks for a tick that starts after this call. Cheap when one is already owed.
    pub fn request(&self) {
        self.shared.request(true);
    }

    /// From a callback on the broker thread: asks for another pass of the loop. A signal sent
    /// now would land before the broker waits, so only the kicker sends them.
    pub fn request_next_pass(&self) {
        self.shared.request(false);
    }

    /// Called by the tick before it drains anything: a request made after this point is owed
    /// the *next* tick. Says whether this tick is a full one: something was requested since the
    /// last full tick, or [`FULL_TICK_EVERY`] has passed.
    pub fn tick_started(&self) -> bool {
        self.shared.tick_started()
    }

    /// Stops and joins the kicker; no signal is sent afterwards. Idempotent.
    pub fn stop(&self) {
        self.shared.halt();
        let handle = self.kicker.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(h) = handle {
            let _ = h.join();
        }
    }
}

impl Drop for Waker {
    fn drop(&mut self) {
        self.stop();
        if USERS.fetch_sub(1, Ordering::SeqCst) == 1 {
            if let Some(old) = OLD_ACTION.lock().unwrap_or_else(|p| p.into_inner()).take() {
                // SAFETY: restores the disposition saved at install; our handler's code is about to
                // be unmapped by dlclose, so it must not stay installed.
                unsafe { libc::sigaction(signo(), &old, std::ptr::null_mut()) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared() -> Shared {
        // SAFETY: pthread_self has no preconditions. No signal is sent: no request kicks here.
        let mut s = Shared::new(unsafe { libc::pthread_self() });
        s.enabled = false;
        s
    }

    #[test]
    fn only_asked_for_or_periodic_ticks_are_full() {
        let s = shared();
        assert!(s.tick_started(), "the first tick is a full one");
        // Positive control for the skip: nothing asked, right after a full tick.
        assert!(!s.tick_started());
        assert!(!s.tick_started());
        s.request(false);
        assert!(s.tick_started(), "a request makes the next tick full");
        assert!(!s.tick_started(), "and only that one");
        std::thread::sleep(FULL_TICK_EVERY + Duration::from_millis(1));
        assert!(s.tick_started(), "the timers get a full tick at least every FULL_TICK_EVERY");
        assert!(!s.tick_started());
    }

    #[test]
    fn a_broker_that_just_ticked_is_not_signalled_until_it_stops_ticking() {
        let s = shared();
        assert!(s.tick_started());
        s.request(true);
        assert_eq!(s.last_kick_ns.load(Ordering::SeqCst), 0, "ticked just now: no signal");
        std::thread::sleep(KICK_EVERY + Duration::from_micros(100));
        // Still owed and no tick since: now it is signalled (what the kicker does when it
        // looks again); the positive control for the skip above.
        assert!(s.owing());
        s.kick();
        assert_ne!(s.last_kick_ns.load(Ordering::SeqCst), 0, "no tick for a while: signalled");
    }

    #[test]
    fn a_stream_of_requests_keeps_the_kicker_at_its_fast_rate() {
        // A broker that sleeps until signalled, and a worker whose next result is queued right
        // after each tick (a backlog drain): a tick is owed again before the kicker looks, every
        // time. The kicker must keep signalling every KICK_EVERY or so; it used to take this
        // for a broker that never ticks and fall back to PERIOD after KICK_GIVE_UP.
        let s = Arc::new(shared());
        let kicker = {
            let s = s.clone();
            std::thread::spawn(move || s.run())
        };
        let start = Instant::now();
        let mut seen = 0;
        let (mut early, mut late) = (0u32, 0u32);
        s.request(false);
        while start.elapsed() < Duration::from_millis(250) {
            let kicked = s.last_kick_ns.load(Ordering::SeqCst);
            if kicked != seen {
                seen = kicked;
                s.tick_started();
                s.request(false);
                // Past KICK_GIVE_UP: the old kicker managed at most 3 here (one per PERIOD).
                if start.elapsed() > KICK_GIVE_UP + Duration::from_millis(10) {
                    late += 1;
                } else {
                    early += 1;
                }
            } else {
                std::thread::sleep(Duration::from_micros(20));
            }
        }
        s.halt();
        kicker.join().unwrap();
        // Positive control: the kicker was signalling at its fast rate before KICK_GIVE_UP.
        assert!(early >= 10, "only {early} signals in the first {KICK_GIVE_UP:?}");
        assert!(late >= 20, "only {late} signals in the 220 ms after {KICK_GIVE_UP:?}");
    }

    #[test]
    fn a_request_racing_a_tick_is_never_lost() {
        // A request and a tick at the same moment, many times: afterwards, either a full tick
        // took the request or it is still marked and still owed a tick (which the kicker
        // signals for). A marked request that is owed nothing would wait for the idle period.
        let s = Arc::new(shared());
        let go = Arc::new(std::sync::Barrier::new(3));
        let ticker = {
            let (s, go) = (s.clone(), go.clone());
            std::thread::spawn(move || {
                for _ in 0..20_000 {
                    go.wait();
                    s.tick_started();
                    go.wait();
                }
            })
        };
        let requester = {
            let (s, go) = (s.clone(), go.clone());
            std::thread::spawn(move || {
                for _ in 0..20_000 {
                    go.wait();
                    s.request(false);
                    go.wait();
                }
            })
        };
        for i in 0..20_000 {
            go.wait();
            go.wait();
            let pending = s.pending.load(Ordering::SeqCst);
            assert!(!pending || s.owing(), "round {i}: a request is marked but no tick is owed");
            // Settle: the owed tick runs (full), so the next round starts from a clean state.
            if s.owing() {
                assert!(s.tick_started() || !pending);
            }
        }
        ticker.join().unwrap();
        requester.join().unwrap();
    }
}
