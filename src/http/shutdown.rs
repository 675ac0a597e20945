//! The stop signal shared, through an `Rc`, by every connection of one executor.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

/// Once triggered, every connection answers the request it is in with
/// `Connection: close` and closes; connections waiting for a request close at once.
/// Anyone else (accept loops, tail streams) can await [`Shutdown::wait`] too.
#[derive(Debug, Default)]
pub struct Shutdown {
    triggered: Cell<bool>,
    /// One waker per pending `wait()`, removed when that future is dropped, so the map
    /// never holds more entries than there are live waiters.
    waiters: RefCell<HashMap<u64, Waker>>,
    next_waiter_id: Cell<u64>,
}

impl Shutdown {
    pub fn new() -> Self {
        Self::default()
    }

    /// Idempotent. Wakes every waiter; nothing polls for the flag.
    pub fn trigger(&self) {
        self.triggered.set(true);
        // Take the wakers out before waking so no borrow is held while tasks run.
        let waiters = std::mem::take(&mut *self.waiters.borrow_mut());
        for (_, waker) in waiters {
            waker.wake();
        }
    }

    pub fn is_triggered(&self) -> bool {
        self.triggered.get()
    }

    /// Completes when [`Shutdown::trigger`] has been called (at once if it already was).
    pub async fn wait(&self) {
        Wait {
            shutdown: self,
            id: None,
        }
        .await
    }
}

struct Wait<'a> {
    shutdown: &'a Shutdown,
    id: Option<u64>,
}

impl Future for Wait<'_> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let shutdown = self.shutdown;
        if shutdown.triggered.get() {
            return Poll::Ready(());
        }
        let id = *self.id.get_or_insert_with(|| {
            let id = shutdown.next_waiter_id.get();
            shutdown.next_waiter_id.set(id + 1);
            id
        });
        let mut waiters = shutdown.waiters.borrow_mut();
        match waiters.get_mut(&id) {
            Some(waker) if waker.will_wake(cx.waker()) => {}
            Some(waker) => waker.clone_from(cx.waker()),
            None => {
                waiters.insert(id, cx.waker().clone());
            }
        }
        Poll::Pending
    }
}

impl Drop for Wait<'_> {
    fn drop(&mut self) {
        if let Some(id) = self.id {
            self.shutdown.waiters.borrow_mut().remove(&id);
        }
    }
}
