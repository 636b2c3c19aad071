//! The runtime of a driver whose [`crate::driver::Disks`] calls block
//! (callers are threads of a transfer, not tasks) but whose client is
//! async: the `aws` and `openstack` drivers.

/// A driver's runtime, shut down in the background when the last clone
/// of its site goes (which may be inside a task of any runtime, where a
/// runtime may not be dropped the usual way).
pub(crate) struct Rt(Option<tokio::runtime::Runtime>);

impl Rt {
    /// Two worker threads named `{kind}-{site}`.
    pub(crate) fn new(kind: &str, site: &str) -> std::io::Result<Self> {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name(format!("{kind}-{site}"))
            .enable_all()
            .build()
            .map(|rt| Self(Some(rt)))
    }
}

impl Rt {
    /// Runs `f` on this runtime from async code of any runtime; a task
    /// that stops (panics, or the runtime shuts down) is a transient
    /// failure of a `what` call.
    pub(crate) async fn run<T: Send + 'static>(
        &self,
        what: &str,
        f: impl std::future::Future<Output = fluidcloud_plugins::Result<T>> + Send + 'static,
    ) -> fluidcloud_plugins::Result<T> {
        self.spawn(f).await.map_err(|e| {
            fluidcloud_plugins::Error::Transient(format!("an {what} call stopped: {e}"))
        })?
    }
}

impl std::ops::Deref for Rt {
    type Target = tokio::runtime::Runtime;
    fn deref(&self) -> &Self::Target {
        self.0.as_ref().expect("the runtime is there until dropped")
    }
}

impl Drop for Rt {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// Runs `f` on a thread of its own: drivers open from async code too,
/// where blocking on a runtime is not allowed.
pub(crate) fn off_runtime<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| s.spawn(f).join()).unwrap_or_else(|p| std::panic::resume_unwind(p))
}
