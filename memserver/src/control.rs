//! The control protocol, donor side: authenticate a connection, open its session, answer its
//! requests and pass the donor's notices (see `protocol` for the messages).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::auth;
use crate::donor::{error, lock, Inner, Session};
use crate::protocol::{
    decode, read_frame, write_msg, ClientMsg, ErrorCode, FrameError, ServerMsg, MAX_LANES, VERSION,
};

pub(crate) async fn serve(
    inner: Arc<Inner>,
    mut s: TcpStream,
    peer: SocketAddr,
) -> Result<(), FrameError> {
    s.set_nodelay(true)?;
    let limit = Duration::from_millis(inner.cfg.control.handshake_timeout_ms);
    let session = match tokio::time::timeout(limit, handshake(&inner, &mut s)).await {
        Ok(Ok(Some(session))) => session,
        Ok(Ok(None)) => return Ok(()),
        Ok(Err(e)) => return Err(e),
        Err(_) => {
            tracing::info!(%peer, "handshake timed out");
            return Ok(());
        }
    };
    tracing::info!(%peer, session = session.id, client = %session.client, "client authenticated");
    let result = requests(&inner, &session, &mut s).await;
    inner.end_session(&session).await;
    result
}

/// Authenticates and opens a session; `None` after a refusal was sent.
async fn handshake(
    inner: &Arc<Inner>,
    s: &mut TcpStream,
) -> Result<Option<Arc<Session>>, FrameError> {
    let (client, nonce_c) = match decode::<ClientMsg>(&read_frame(s).await?) {
        Ok(ClientMsg::Hello {
            version,
            client,
            nonce,
        }) if version == VERSION => (client, nonce),
        Ok(ClientMsg::Hello { version, .. }) => {
            let msg = format!(
                "protocol version {version} is not supported (this donor speaks {VERSION})"
            );
            write_msg(s, &error(None, ErrorCode::Version, msg)).await?;
            return Ok(None);
        }
        _ => {
            write_msg(s, &error(None, ErrorCode::BadRequest, "expected hello")).await?;
            return Ok(None);
        }
    };
    if client.len() > 256 || nonce_c.len() != 64 {
        write_msg(
            s,
            &error(
                None,
                ErrorCode::BadRequest,
                "client name or nonce malformed",
            ),
        )
        .await?;
        return Ok(None);
    }
    let nonce_s = auth::nonce();
    write_msg(
        s,
        &ServerMsg::Challenge {
            version: VERSION,
            nonce: nonce_s.clone(),
        },
    )
    .await?;
    let ok = match decode::<ClientMsg>(&read_frame(s).await?) {
        Ok(ClientMsg::Auth { mac }) => {
            auth::verify_client(&inner.secret, &nonce_s, &nonce_c, &client, &mac)
        }
        _ => false,
    };
    if !ok {
        tracing::warn!(%client, "authentication failed");
        inner.counters.auth_failures.fetch_add(1, Ordering::Relaxed);
        write_msg(
            s,
            &error(None, ErrorCode::AuthFailed, "authentication failed"),
        )
        .await?;
        return Ok(None);
    }
    let session = match inner.open_session(&client) {
        Ok(x) => x,
        Err(e) => {
            write_msg(s, &error(None, ErrorCode::Internal, e.to_string())).await?;
            return Ok(None);
        }
    };
    let ip = s.local_addr()?.ip();
    let (data_addr, token) = match inner.open_data(&session, ip, 0) {
        Ok(x) => x,
        Err(e) => {
            inner.drop_session(&session);
            write_msg(
                s,
                &error(None, ErrorCode::Internal, format!("data listener: {e}")),
            )
            .await?;
            return Ok(None);
        }
    };
    write_msg(
        s,
        &ServerMsg::Welcome {
            mac: auth::server_proof(&inner.secret, &nonce_c, &nonce_s),
            session: format!("{:016x}", session.id),
            slab_size: inner.cfg.slab_size.0,
            lease_ms: inner.cfg.lease().as_millis() as u64,
            data_addr: data_addr.to_string(),
            data_token: token,
        },
    )
    .await?;
    Ok(Some(session))
}

async fn requests(
    inner: &Arc<Inner>,
    session: &Arc<Session>,
    s: &mut TcpStream,
) -> Result<(), FrameError> {
    let ip = s.local_addr()?.ip();
    let Some(mut notices) = lock(&session.notices_rx).take() else {
        return Ok(());
    };
    let (r, mut w) = s.split();
    // Frames are read by their own future so a notice never interrupts one half-read.
    let (frames_tx, mut frames) = mpsc::channel::<Result<Vec<u8>, FrameError>>(4);
    let reader = async move {
        let mut r = r;
        loop {
            let f = read_frame(&mut r).await;
            let stop = f.is_err();
            if frames_tx.send(f).await.is_err() || stop {
                return;
            }
        }
    };
    tokio::pin!(reader);
    let mut reader_done = false;
    let s = &mut w;
    loop {
        let body = tokio::select! {
            // Once the reader stops, its channel closes and `recv` reports why.
            _ = &mut reader, if !reader_done => {
                reader_done = true;
                continue;
            }
            b = frames.recv() => match b {
                Some(b) => b?,
                None => return Ok(()),
            },
            Some(n) = notices.recv() => {
                write_msg(s, &n).await?;
                continue;
            }
            _ = session.ended.notified() => {
                while let Ok(n) = notices.try_recv() {
                    write_msg(s, &n).await?;
                }
                return Ok(());
            }
        };
        let reply = match decode::<ClientMsg>(&body) {
            Err(e) => error(
                None,
                ErrorCode::BadRequest,
                format!("{e}: {}", e.source_text()),
            ),
            Ok(ClientMsg::Reconnect { id, lane }) if lane >= MAX_LANES => error(
                Some(id),
                ErrorCode::TooMany,
                format!("lane {lane}: at most {MAX_LANES} data queue pairs a session"),
            ),
            Ok(ClientMsg::Reconnect { id, lane }) => match inner.open_data(session, ip, lane) {
                Ok((addr, token)) => ServerMsg::Reconnect {
                    id,
                    data_addr: addr.to_string(),
                    data_token: token,
                },
                Err(e) => error(Some(id), ErrorCode::Internal, format!("data listener: {e}")),
            },
            Ok(msg) => inner.handle(session, msg).await,
        };
        if matches!(reply, ServerMsg::Error { .. }) {
            inner.counters.bad_requests.fetch_add(1, Ordering::Relaxed);
        }
        write_msg(s, &reply).await?;
    }
}

trait SourceText {
    fn source_text(&self) -> String;
}

impl SourceText for FrameError {
    fn source_text(&self) -> String {
        std::error::Error::source(self)
            .map(|e| e.to_string())
            .unwrap_or_default()
    }
}
