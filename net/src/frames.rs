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
    if len > MAX_FRAME_BYTES {
        return Err(FrameError::Oversized {
            len,
            max: MAX_FRAME_BYTES,
        }
        .into());
    }
    let mut body = vec![0u8; len];
    recv.read_exact(&mut body).await.map_err(|e| match e {
        quinn::ReadExactError::FinishedEarly(have) => {
            StreamError::Frame(FrameError::Truncated { have, want: len })
        }
        quinn::ReadExactError::ReadError(e) => StreamError::Io(e.to_string()),
    })?;
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
