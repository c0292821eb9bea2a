//! A connection's single writer: takes the whole outbound queue, writes it with vectored writes,
//! and keeps `buffered_amount` and congestion exact.

use std::io::{self, IoSlice};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::net::tcp::OwnedWriteHalf;

use super::conn::Conn;
use super::events::Event;
use super::frame::OutFrame;
use super::outbound::Taken;

/// Linux's IOV_MAX: more slices than this in one writev is EINVAL.
const MAX_SLICES: usize = 1024;

pub async fn run(conn: Arc<Conn>, write: OwnedWriteHalf) {
    let mut batch: Vec<OutFrame> = Vec::new();
    loop {
        if conn.terminated.load(Ordering::Acquire) {
            break;
        }
        match conn.out.take(&mut batch) {
            Taken::Finished => break,
            Taken::Empty => {
                conn.out.wake_writer.notified().await;
                continue;
            }
            Taken::Frames => {}
        }
        if write_batch(&conn, &write, &batch).await.is_err() {
            // The peer is gone: nothing queued can be delivered any more.
            conn.terminate();
            break;
        }
        batch.clear();
        if conn.out.is_empty() && conn.out.clear_congested() {
            conn.shared.events.push(Event::Drain(conn.id));
        }
    }
    // Dropping the write half sends FIN; the reader owns the other half.
    drop(write);
}

async fn write_batch(conn: &Conn, write: &OwnedWriteHalf, batch: &[OutFrame]) -> io::Result<()> {
    let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(batch.len() * 2);
    for frame in batch {
        if !frame.head().is_empty() {
            slices.push(IoSlice::new(frame.head()));
        }
        if !frame.payload().is_empty() {
            slices.push(IoSlice::new(frame.payload()));
        }
    }
    let mut remaining: &mut [IoSlice<'_>] = &mut slices;
    while !remaining.is_empty() {
        let window = remaining.len().min(MAX_SLICES);
        match write.try_write_vectored(&remaining[..window]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                conn.out.wrote(n);
                IoSlice::advance_slices(&mut remaining, n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                conn.out.set_congested();
                tokio::select! {
                    ready = write.writable() => ready?,
                    // Woken by a push or by terminate: only the latter stops the write.
                    _ = conn.out.wake_writer.notified() => {
                        if conn.terminated.load(Ordering::Acquire) {
                            return Err(io::ErrorKind::ConnectionAborted.into());
                        }
                    }
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
