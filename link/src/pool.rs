//! A small process-wide pool of reusable objects (relay copy buffers, splice pipes): what is
//! given back is kept up to a limit and handed out again; beyond the limit it is dropped.

use std::sync::Mutex;

/// Free objects, at most `keep` of them.
pub(crate) struct Pool<T> {
    free: Mutex<Vec<T>>,
    keep: usize,
}

impl<T> Pool<T> {
    /// An empty pool keeping at most `keep` objects.
    pub(crate) const fn new(keep: usize) -> Self {
        Pool {
            free: Mutex::new(Vec::new()),
            keep,
        }
    }

    /// A free object, if the pool holds one.
    pub(crate) fn take(&self) -> Option<T> {
        self.free.lock().ok().and_then(|mut f| f.pop())
    }

    /// Keeps `item` for reuse, or drops it when the pool is full.
    pub(crate) fn give(&self, item: T) {
        if let Ok(mut f) = self.free.lock()
            && f.len() < self.keep
        {
            f.push(item);
        }
    }
}
