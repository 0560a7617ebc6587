//! Idle detection for sessions without work per message: the upstream
//! stream is wrapped so every completed read or write marks the session
//! active (one relaxed store), and a timer looks at the mark once per
//! period. A session is ended after one full period with no traffic, so
//! between one and two periods after its last byte.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The activity mark of one session.
#[derive(Debug, Default)]
pub struct Idle {
    active: AtomicBool,
}

impl Idle {
    /// Resolves once a whole `period` passed with no traffic; never when
    /// `period` is `None`.
    pub async fn expired(&self, period: Option<Duration>) {
        let Some(period) = period else {
            return std::future::pending().await;
        };
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        loop {
            tick.tick().await;
            if !self.active.swap(false, Relaxed) {
                return;
            }
        }
    }
}

/// A stream that marks [`Idle`] on every byte moved.
#[derive(Debug)]
pub struct Activity<'a, S: ?Sized> {
    idle: &'a Idle,
    inner: &'a mut S,
}

impl<'a, S: ?Sized> Activity<'a, S> {
    pub fn new(inner: &'a mut S, idle: &'a Idle) -> Self {
        Activity { idle, inner }
    }
}

impl<S: AsyncRead + Unpin + ?Sized> AsyncRead for Activity<'_, S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut *self.inner).poll_read(cx, buf);
        if buf.filled().len() != before {
            self.idle.active.store(true, Relaxed);
        }
        r
    }
}

impl<S: AsyncWrite + Unpin + ?Sized> AsyncWrite for Activity<'_, S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut *self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r
            && n > 0
        {
            self.idle.active.store(true, Relaxed);
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test(start_paused = true)]
    async fn traffic_keeps_a_session_alive_and_silence_ends_it() {
        let idle = Idle::default();
        let (mut a, _b) = tokio::io::duplex(1024);
        let period = Duration::from_secs(10);
        let expired = idle.expired(Some(period));
        tokio::pin!(expired);
        // Traffic every 3s (never at a period's edge): not expired after
        // almost 3 periods.
        for _ in 0..9 {
            Activity::new(&mut a, &idle).write_all(b"x").await.unwrap();
            tokio::select! {
                _ = &mut expired => panic!("expired despite traffic"),
                _ = tokio::time::sleep(Duration::from_secs(3)) => {}
            }
        }
        // Silence: expires within two periods.
        tokio::time::timeout(period * 2, &mut expired)
            .await
            .expect("silent session not ended");
    }
}
