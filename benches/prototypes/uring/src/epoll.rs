//! The epoll twin: the same shape as the io_uring mode on a Tokio current-thread runtime per thread,
//! Tokio `TcpStream` reads and writes (readiness from epoll, edge-triggered).

use std::io;
use std::net::{Shutdown, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::Duration;

use socket2::{SockRef, Socket};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};

use crate::Options;

pub fn run(sock: Socket, o: &Options) -> io::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?;
    let (backend, buf) = (o.backend, o.buf);
    rt.block_on(async move {
        sock.set_nonblocking(true)?;
        let listener = TcpListener::from_std(sock.into())?;
        loop {
            match listener.accept().await {
                Ok((client, _)) => {
                    tokio::spawn(serve(client, backend, buf));
                }
                // Out of descriptors or memory: wait a little rather than spin (a real server counts it).
                Err(e) if is_resource(&e) => std::thread::sleep(Duration::from_millis(10)),
                Err(_) => {}
            }
        }
    })
}

fn is_resource(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// Both sides closed with `SO_LINGER` 0: the peers see a reset.
fn reset(socks: &[&TcpStream]) {
    for s in socks {
        let _ = SockRef::from(*s).set_linger(Some(Duration::ZERO));
    }
}

async fn serve(mut client: TcpStream, backend_addr: SocketAddr, buf: usize) {
    let mut backend = match TcpStream::connect(backend_addr).await {
        Ok(b) => b,
        Err(_) => return reset(&[&client]),
    };
    if backend.set_nodelay(true).is_err() {
        return reset(&[&client, &backend]);
    }
    let (up_ended, down_ended) = (AtomicBool::new(false), AtomicBool::new(false));
    let failed = {
        let (cr, cw) = client.split();
        let (br, bw) = backend.split();
        let up = pump(cr, bw, buf, &up_ended, &down_ended);
        let down = pump(br, cw, buf, &down_ended, &up_ended);
        tokio::pin!(up, down);
        let (mut up_done, mut down_done) = (false, false);
        loop {
            tokio::select! {
                r = &mut up, if !up_done => match r {
                    Ok(()) => up_done = true,
                    Err(_) => break true,
                },
                r = &mut down, if !down_done => match r {
                    Ok(()) => down_done = true,
                    Err(_) => break true,
                },
            }
            if up_done && down_done {
                break false;
            }
        }
    };
    if failed {
        reset(&[&client, &backend]);
    }
    // Dropping both closes them: a FIN after every byte written, or a reset after SO_LINGER 0.
}

/// One direction: read, write it all, until EOF; then pass the FIN on unless the other direction has
/// ended already (then the close sends it).
async fn pump(
    mut from: ReadHalf<'_>,
    mut to: WriteHalf<'_>,
    buf: usize,
    ended: &AtomicBool,
    other_ended: &AtomicBool,
) -> io::Result<()> {
    let mut b = vec![0u8; buf];
    loop {
        let n = from.read(&mut b).await?;
        if n == 0 {
            ended.store(true, Relaxed);
            if !other_ended.load(Relaxed) {
                SockRef::from(to.as_ref()).shutdown(Shutdown::Write)?;
            }
            return Ok(());
        }
        to.write_all(&b[..n]).await?;
    }
}
