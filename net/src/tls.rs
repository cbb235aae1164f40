//! TLS for QUIC with identities pinned to Ed25519 keys, without any CA.
//!
//! Each party's certificate is self-signed by its Tidepool key. A node pins
//! the pool's key (`--pool-key`); the pool learns each peer's key from its
//! client certificate and decides admission in the application protocol (so
//! a refused node gets a readable error, not a TLS alert). The TLS handshake
//! signature is checked against the very key read from the certificate, so
//! holding the certificate is not enough: the peer must hold the secret key.

use ring::signature::{UnparsedPublicKey, ED25519};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use tidepool_proto::{PublicKey, SecretKey};

/// The ALPN protocol id of Tidepool's protocol.
pub const ALPN: &[u8] = b"tidepool/1";

/// A self-signed certificate for `key`, and the key in rustls's form.
pub fn certificate(
    key: &SecretKey,
) -> Result<(CertificateDer<'static>, PrivateKeyDer<'static>), rcgen::Error> {
    let pkcs8 = PrivatePkcs8KeyDer::from(key.pkcs8().to_vec());
    let pair = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(&pkcs8, &rcgen::PKCS_ED25519)?;
    let mut params = rcgen::CertificateParams::new(vec!["tidepool".to_owned()])?;
    params.distinguished_name.push(
        rcgen::DnType::CommonName,
        format!("tidepool {}", key.public()),
    );
    let cert = params.self_signed(&pair)?;
    Ok((cert.der().clone(), PrivateKeyDer::Pkcs8(pkcs8)))
}

/// One DER element: (tag, contents, rest).
fn der(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (first as usize, rest)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | *b as usize);
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

/// The Ed25519 public key in a certificate's subjectPublicKeyInfo, read by
/// walking the certificate's structure (not by searching its bytes).
pub fn ed25519_key_of(cert: &[u8]) -> Option<PublicKey> {
    const SEQ: u8 = 0x30;
    let (tag, certificate, _) = der(cert)?;
    if tag != SEQ {
        return None;
    }
    let (tag, tbs, _) = der(certificate)?;
    if tag != SEQ {
        return None;
    }
    let mut rest = tbs;
    // Optional [0] version.
    let (tag, _, after) = der(rest)?;
    if tag == 0xa0 {
        rest = after;
    }
    // serialNumber, signature, issuer, validity, subject.
    for want in [0x02, SEQ, SEQ, SEQ, SEQ] {
        let (tag, _, after) = der(rest)?;
        if tag != want {
            return None;
        }
        rest = after;
    }
    let (tag, spki, _) = der(rest)?;
    if tag != SEQ {
        return None;
    }
    let (tag, alg, bits) = der(spki)?;
    // AlgorithmIdentifier { id-Ed25519 (1.3.101.112) } with no parameters.
    if tag != SEQ || alg != [0x06, 0x03, 0x2b, 0x65, 0x70] {
        return None;
    }
    let (tag, key, trailing) = der(bits)?;
    if tag != 0x03 || !trailing.is_empty() || key.len() != 33 || key[0] != 0 {
        return None;
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(&key[1..]);
    Some(PublicKey(out))
}

fn bad_cert() -> rustls::Error {
    rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding)
}

fn verify_handshake(
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    if dss.scheme != SignatureScheme::ED25519 {
        return Err(rustls::Error::PeerMisbehaved(
            rustls::PeerMisbehaved::SignedHandshakeWithUnadvertisedSigScheme,
        ));
    }
    let key = ed25519_key_of(cert).ok_or_else(bad_cert)?;
    UnparsedPublicKey::new(&ED25519, &key.0)
        .verify(message, dss.signature())
        .map_err(|_| rustls::Error::InvalidCertificate(rustls::CertificateError::BadSignature))?;
    Ok(HandshakeSignatureValid::assertion())
}

/// The handshake-signature methods both verifiers share: TLS 1.3 only,
/// Ed25519 only, checked against the key in the peer's certificate.
macro_rules! ed25519_handshake_only {
    () => {
        fn verify_tls12_signature(
            &self,
            _message: &[u8],
            _cert: &CertificateDer<'_>,
            _dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            Err(rustls::Error::General("TLS 1.2 is not used".into()))
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            verify_handshake(message, cert, dss)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            vec![SignatureScheme::ED25519]
        }
    };
}

/// A node's (or client's) check of the pool: its certificate must carry the
/// pinned key.
#[derive(Debug)]
pub struct PinnedServer {
    /// The pool's key, given by the node owner.
    pub expected: PublicKey,
}

impl ServerCertVerifier for PinnedServer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match ed25519_key_of(end_entity) {
            Some(k) if k == self.expected => Ok(ServerCertVerified::assertion()),
            Some(k) => Err(rustls::Error::General(format!(
                "the pool presented key {k}, not the expected {}",
                self.expected
            ))),
            None => Err(bad_cert()),
        }
    }

    ed25519_handshake_only!();
}

/// The pool's check of a connecting peer: any well-formed Ed25519
/// certificate whose key signs the handshake. Admission is decided later.
#[derive(Debug)]
pub struct AnyEd25519Client;

impl ClientCertVerifier for AnyEd25519Client {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        ed25519_key_of(end_entity)
            .map(|_| ClientCertVerified::assertion())
            .ok_or_else(bad_cert)
    }

    ed25519_handshake_only!();
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidepool_proto::KeyRole;

    #[test]
    fn key_is_read_from_the_certificate_structure() {
        let key = SecretKey::from_seed(KeyRole::Pool, &[5; 32]);
        let (cert, _) = certificate(&key).expect("cert");
        assert_eq!(ed25519_key_of(&cert), Some(key.public()));
        // The key's bytes appear in the subject too (the common name holds its
        // text form, not its bytes), yet only the SPKI counts: truncations and
        // garbage give None rather than a wrong key.
        for cut in [0, 1, 10, cert.len() / 2, cert.len() - 1] {
            assert_eq!(ed25519_key_of(&cert[..cut]), None, "cut at {cut}");
        }
        assert_eq!(ed25519_key_of(b"\x30\x82\xff\xff garbage"), None);
    }
}
