//! Worker stdout/stderr, passed through line by line with a `[worker <id>] ` prefix.
//!
//! Reader tasks (one per stream) cut lines and send them to one writer thread, which writes each whole line
//! with a single `write_all` on the supervisor's own stdout or stderr. Lines from different workers never
//! interleave inside a line, and a slow terminal or pipe blocks that thread, not the runtime; the bounded
//! queue then slows the readers, so memory stays bounded. A line longer than 64 KiB is cut into pieces.

use std::io::Write;

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::sync::mpsc;

const MAX_LINE: usize = 64 * 1024;

/// Which of the supervisor's streams a line goes to.
#[derive(Debug, Clone, Copy)]
pub(super) enum Stream {
    Out,
    Err,
}

/// Sends prefixed lines to the writer thread. Dropping every clone ends the thread.
#[derive(Debug, Clone)]
pub(super) struct Output {
    tx: mpsc::Sender<(Stream, Vec<u8>)>,
}

impl Output {
    /// Starts the writer thread.
    pub(super) fn start() -> std::io::Result<Output> {
        let (tx, mut rx) = mpsc::channel::<(Stream, Vec<u8>)>(1024);
        std::thread::Builder::new()
            .name("ulb-cluster-output".into())
            .spawn(move || {
                while let Some((stream, line)) = rx.blocking_recv() {
                    // Nothing sensible to do if our own stdout/stderr is gone: the line is dropped.
                    let _ = match stream {
                        Stream::Out => std::io::stdout().lock().write_all(&line),
                        Stream::Err => std::io::stderr().lock().write_all(&line),
                    };
                }
            })?;
        Ok(Output { tx })
    }

    /// Copies `reader` line by line, each prefixed with `[worker <id>] `, until it ends.
    pub(super) fn forward(
        &self,
        id: usize,
        stream: Stream,
        reader: impl AsyncRead + Unpin + Send + 'static,
    ) {
        let tx = self.tx.clone();
        let prefix = format!("[worker {id}] ");
        tokio::spawn(async move {
            let mut reader = BufReader::with_capacity(MAX_LINE, reader);
            let mut line = prefix.clone().into_bytes();
            loop {
                let buf = match reader.fill_buf().await {
                    Ok([]) | Err(_) => {
                        if line.len() > prefix.len() {
                            line.push(b'\n');
                            let _ = tx.send((stream, line)).await;
                        }
                        return;
                    }
                    Ok(buf) => buf,
                };
                let room = (prefix.len() + MAX_LINE).saturating_sub(line.len()).max(1);
                let chunk = &buf[..buf.len().min(room)];
                let (take, full) = match chunk.iter().position(|&b| b == b'\n') {
                    Some(i) => (i + 1, true),
                    None => (
                        chunk.len(),
                        line.len() + chunk.len() >= prefix.len() + MAX_LINE,
                    ),
                };
                line.extend_from_slice(&chunk[..take]);
                reader.consume(take);
                if full {
                    if line.last() != Some(&b'\n') {
                        line.push(b'\n');
                    }
                    let next = prefix.clone().into_bytes();
                    if tx
                        .send((stream, std::mem::replace(&mut line, next)))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
        });
    }
}
