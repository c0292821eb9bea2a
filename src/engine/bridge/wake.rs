//! The wake-up the asyncio loop watches: an eventfd on Linux, a pipe elsewhere (and on Linux
//! with `BRIOCHE_PORTABLE=1`, `platform.rs`).
//!
//! Written at most once per batch (never again until the loop clears it, as it takes the
//! queue), so its syscall cost is shared by every event in the batch.

use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

pub(crate) struct Wakeup {
    read_fd: RawFd,
    write_fd: RawFd,
    /// Written since the last `clear`: a wake-up has nothing to write.
    set: AtomicBool,
    /// How many times the loop has taken the events it is woken for (`EventQueue::drain_into`
    /// counts them, under the queue's lock): an event pushed when this was `n` is taken by
    /// drain `n + 1` (`EventQueue::handled_since`), so read in a push and again later, a change
    /// says the push's events have been taken and need no wake-up any more. Kept here, not
    /// beside the queue, for the workers that owe a wake-up (`DeferredWakes`), which hold the
    /// wake-up only.
    pub(crate) drains: AtomicU32,
}

impl Wakeup {
    pub(crate) fn new() -> io::Result<Self> {
        #[cfg(target_os = "linux")]
        if !crate::engine::platform::portable() {
            return Self::eventfd();
        }
        Self::pipe()
    }

    #[cfg(target_os = "linux")]
    fn eventfd() -> io::Result<Self> {
        // SAFETY: eventfd takes no pointers; the result is checked below.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self::of(fd, fd))
    }

    fn pipe() -> io::Result<Self> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: `fds` is a valid array of two descriptors for pipe to fill.
        if unsafe { libc::pipe(fds.as_mut_ptr()) } < 0 {
            return Err(io::Error::last_os_error());
        }
        for fd in fds {
            // SAFETY: fd was just returned by pipe.
            unsafe {
                libc::fcntl(fd, libc::F_SETFL, libc::O_NONBLOCK);
                libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
            }
        }
        Ok(Self::of(fds[0], fds[1]))
    }

    fn of(read_fd: RawFd, write_fd: RawFd) -> Self {
        Self {
            read_fd,
            write_fd,
            set: AtomicBool::new(false),
            drains: AtomicU32::new(0),
        }
    }

    /// The descriptor that becomes readable after [`Wakeup::wake`].
    pub(crate) fn fd(&self) -> RawFd {
        self.read_fd
    }

    pub(crate) fn wake(&self) {
        // Set since the last clear: readable, or about to be (whoever set it writes next).
        if self.set.swap(true, Ordering::AcqRel) {
            return;
        }
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64. A full eventfd/pipe (EAGAIN) already means
        // "readable", which is all a wake-up has to achieve, so the result is ignored.
        unsafe {
            libc::write(self.write_fd, (&one as *const u64).cast(), 8);
        }
    }

    /// Consume pending wake-ups so the descriptor stops being readable.
    pub(crate) fn clear(&self) {
        let mut buf = [0u8; 64];
        loop {
            // SAFETY: reads into a live, correctly sized buffer.
            let n = unsafe { libc::read(self.read_fd, buf.as_mut_ptr().cast(), buf.len()) };
            // An eventfd is drained by one read; a pipe may need several.
            if n < buf.len() as isize || self.read_fd == self.write_fd {
                break;
            }
        }
        // After the read, and a swap rather than a store: a wake-up that found the flag set
        // and wrote nothing (its write taken by this read, or still to come) queued its events
        // before the swap it is ordered before, and so before the caller takes them.
        self.set.swap(false, Ordering::AcqRel);
    }
}

impl Drop for Wakeup {
    fn drop(&mut self) {
        // SAFETY: both descriptors are owned by this value and closed exactly once.
        unsafe {
            libc::close(self.read_fd);
            if self.write_fd != self.read_fd {
                libc::close(self.write_fd);
            }
        }
    }
}

#[cfg(test)]
impl Wakeup {
    /// How many times the descriptor was written since the last read, which this is.
    pub(crate) fn take_writes(&self) -> usize {
        let mut buf = [0u8; 64];
        // SAFETY: reads into a live, correctly sized buffer.
        let n = unsafe { libc::read(self.read_fd, buf.as_mut_ptr().cast(), buf.len()) };
        match n {
            ..=0 => 0,
            // An eventfd's read is its count; a pipe's, 8 bytes a write.
            _ if self.read_fd == self.write_fd => {
                u64::from_ne_bytes(buf[..8].try_into().unwrap()) as usize
            }
            n => n as usize / 8,
        }
    }
}

/// Whether `fd` becomes readable within `timeout_ms` (0: right now). For tests.
#[cfg(test)]
pub(crate) fn poll_readable(fd: RawFd, timeout_ms: i32) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut pfd, 1, timeout_ms) == 1 }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn readable(fd: RawFd) -> bool {
        poll_readable(fd, 0)
    }

    fn check(w: Wakeup) {
        assert!(!readable(w.fd()));
        for _ in 0..100 {
            w.wake();
        }
        assert!(readable(w.fd()));
        w.clear();
        assert!(!readable(w.fd()));
        w.wake();
        assert!(readable(w.fd()));
        w.wake();
        // Written once until the loop clears it, however many wake it meanwhile.
        assert_eq!(w.take_writes(), 1);
    }

    #[test]
    fn wake_makes_fd_readable_until_cleared() {
        check(Wakeup::new().unwrap());
    }

    /// The portable path, whatever `BRIOCHE_PORTABLE` says.
    #[test]
    fn the_pipe_wakes_and_clears_too() {
        check(Wakeup::pipe().unwrap());
    }
}
