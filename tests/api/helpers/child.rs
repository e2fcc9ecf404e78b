//! Processes a test starts itself (`redis-server`, `prometheus`, the broker binary): a free
//! port for them, and [`ChildGuard`], which stops one when the test ends, passed or failed.

use std::process::Child;

/// A child process that is killed and reaped when dropped, so no test leaves one behind (a
/// panicking test drops it too).
pub struct ChildGuard(Child);

impl ChildGuard {
    /// Takes charge of `child`.
    pub fn new(child: Child) -> Self {
        Self(child)
    }

    /// The process, to signal or wait for.
    pub fn child(&mut self) -> &mut Child {
        &mut self.0
    }

    /// Its process id.
    pub fn id(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// A free loopback port for a server a test starts itself, never handed out twice by this
/// process: taken below the kernel's ephemeral range, so no port-0 listener of another test can
/// take it while its server is down for a restart.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = std::process::id() % 5_000;
    loop {
        let offset = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = u16::try_from(20_000 + (start + offset) % 12_000).expect("below 32000");
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}
