//! What a receiver recorded, and the thread it serves on.

use std::{
    fmt,
    future::Future,
    sync::{Condvar, Mutex, PoisonError},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use tokio::sync::{oneshot, watch};

/// A wait for recorded items ended at its deadline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WaitTimeout {
    pub what: &'static str,
    pub wanted: usize,
    pub got: usize,
    pub waited: Duration,
}

impl fmt::Display for WaitTimeout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "waited {:?} for {} {}, got {}",
            self.waited, self.wanted, self.what, self.got
        )
    }
}

impl std::error::Error for WaitTimeout {}

/// Items recorded in arrival order, with async and blocking waits for a count.
pub(crate) struct Log<T> {
    what: &'static str,
    items: Mutex<Vec<T>>,
    changed: Condvar,
    count: watch::Sender<usize>,
}

impl<T: Clone> Log<T> {
    pub(crate) fn new(what: &'static str) -> Self {
        Self {
            what,
            items: Mutex::new(Vec::new()),
            changed: Condvar::new(),
            count: watch::Sender::new(0),
        }
    }

    pub(crate) fn push(&self, item: T) {
        let mut items = self.items.lock().unwrap_or_else(PoisonError::into_inner);
        items.push(item);
        self.count.send_replace(items.len());
        self.changed.notify_all();
    }

    pub(crate) fn snapshot(&self) -> Vec<T> {
        self.items
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub(crate) fn len(&self) -> usize {
        self.items
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    fn timeout(&self, wanted: usize, timeout: Duration) -> WaitTimeout {
        WaitTimeout {
            what: self.what,
            wanted,
            got: self.len(),
            waited: timeout,
        }
    }

    /// Waits until at least `n` items are recorded; all of them.
    pub(crate) async fn wait_for(
        &self,
        n: usize,
        timeout: Duration,
    ) -> Result<Vec<T>, WaitTimeout> {
        let mut count = self.count.subscribe();
        // The sender lives as long as `self`: the channel cannot close while we wait.
        let reached = tokio::time::timeout(timeout, count.wait_for(|c| *c >= n))
            .await
            .is_ok_and(|seen| seen.is_ok());
        if reached {
            Ok(self.snapshot())
        } else {
            Err(self.timeout(n, timeout))
        }
    }

    /// [`Log::wait_for`] for synchronous callers.
    pub(crate) fn wait_for_blocking(
        &self,
        n: usize,
        timeout: Duration,
    ) -> Result<Vec<T>, WaitTimeout> {
        let deadline = Instant::now() + timeout;
        let mut items = self.items.lock().unwrap_or_else(PoisonError::into_inner);
        while items.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                drop(items);
                return Err(self.timeout(n, timeout));
            }
            items = self
                .changed
                .wait_timeout(items, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        Ok(items.clone())
    }
}

/// A server running on its own thread and runtime until dropped.
pub(crate) struct Background {
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Background {
    /// Binds `127.0.0.1:0` and runs `serve(listener)` on a new thread until the value is
    /// dropped; returns it with the bound address.
    pub(crate) fn start<F, Fut>(
        name: &str,
        serve: F,
    ) -> std::io::Result<(Self, std::net::SocketAddr)>
    where
        F: FnOnce(tokio::net::TcpListener) -> Fut + Send + 'static,
        Fut: Future<Output = ()>,
    {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let address = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let listener = {
            let _context = runtime.enter();
            tokio::net::TcpListener::from_std(listener)?
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                runtime.block_on(async move {
                    tokio::select! {
                        _ = stopped => {}
                        () = serve(listener) => {}
                    }
                });
                // Dropping the runtime here ends the connections' tasks.
            })?;
        Ok((
            Self {
                stop: Some(stop),
                thread: Some(thread),
            },
            address,
        ))
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
