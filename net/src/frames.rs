//! Reading and writing [`tidepool_proto::wire`] frames on QUIC streams.

use serde::{de::DeserializeOwned, Serialize};
use tidepool_proto::wire::{decode_body, encode, FrameError, MAX_FRAME_BYTES};

/// Errors on a framed stream.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The peer sent a bad frame.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The stream failed (reset, connection lost).
    #[error("stream: {0}")]
    Io(String),
}

/// Most bytes taken from the stream at a time while reading a frame body.
const READ_CHUNK: usize = 64 * 1024;

/// Write one frame.
pub async fn write_frame<T: Serialize>(
    send: &mut quinn::SendStream,
    msg: &T,
) -> Result<(), StreamError> {
    let bytes = encode(msg)?;
    send.write_all(&bytes)
        .await
        .map_err(|e| StreamError::Io(e.to_string()))
}

/// Read one frame; `None` if the stream ended cleanly before it.
pub async fn read_frame<T: DeserializeOwned>(
    recv: &mut quinn::RecvStream,
) -> Result<Option<T>, StreamError> {
    read_frame_within(recv, MAX_FRAME_BYTES).await
}

/// Read one frame of at most `max` bytes (refused from its length prefix).
/// Memory grows with the bytes that arrive, not with the length the peer
/// announces, so a half-sent frame pins only what was sent.
pub async fn read_frame_within<T: DeserializeOwned>(
    recv: &mut quinn::RecvStream,
    max: usize,
) -> Result<Option<T>, StreamError> {
    let max = max.min(MAX_FRAME_BYTES);
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match recv
            .read(&mut len[got..])
            .await
            .map_err(|e| StreamError::Io(e.to_string()))?
        {
            Some(n) => got += n,
            None if got == 0 => return Ok(None),
            None => return Err(FrameError::Truncated { have: got, want: 4 }.into()),
        }
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > max {
        return Err(FrameError::Oversized { len, max }.into());
    }
    let mut body = Vec::with_capacity(len.min(READ_CHUNK));
    while body.len() < len {
        let want = (len - body.len()).min(READ_CHUNK);
        match recv
            .read_chunk(want, true)
            .await
            .map_err(|e| StreamError::Io(e.to_string()))?
        {
            Some(chunk) => body.extend_from_slice(&chunk.bytes),
            None => {
                return Err(FrameError::Truncated {
                    have: body.len(),
                    want: len,
                }
                .into())
            }
        }
    }
    Ok(Some(decode_body(&body)?))
}

/// Send one request on a new stream and read the first response frame.
pub async fn call<Q: Serialize, R: DeserializeOwned>(
    conn: &quinn::Connection,
    req: &Q,
) -> Result<R, StreamError> {
    let (mut send, mut recv) = conn
        .open_bi()
        .await
        .map_err(|e| StreamError::Io(e.to_string()))?;
    write_frame(&mut send, req).await?;
    send.finish().map_err(|e| StreamError::Io(e.to_string()))?;
    read_frame(&mut recv)
        .await?
        .ok_or_else(|| StreamError::Io("the pool closed the stream without answering".into()))
}
