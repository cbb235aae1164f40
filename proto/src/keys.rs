//! Ed25519 identities and signatures (ring).
//!
//! Every party has one key: a pool owner signs bundles with it, a pool and a
//! node authenticate their QUIC connections with it (their TLS certificates are
//! derived from it), and a node signs its receipts with it. Public keys print
//! as `ed25519:` followed by 43 characters of unpadded base64url.
//!
//! Every signature is made over a domain-separation tag followed by the
//! message, so a signature made for one purpose (a receipt) can never be
//! replayed as another (a manifest).
//!
//! This module never touches files: callers read and write the text forms.

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use ring::signature::{Ed25519KeyPair, KeyPair as _, UnparsedPublicKey, ED25519};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Tag for signatures over locked manifests.
pub const MANIFEST_TAG: &[u8] = b"tidepool/manifest/v1\0";
/// Tag for signatures over receipts.
pub const RECEIPT_TAG: &[u8] = b"tidepool/receipt/v1\0";
/// Tag for a pool's signatures over pages of its settlement ledger.
pub const LEDGER_TAG: &[u8] = b"tidepool/ledger/v1\0";

/// Errors reading or using keys.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// A public key's text is not `ed25519:<43 base64url characters>`.
    #[error("not a tidepool public key (expected `ed25519:` and 43 base64url characters): {0:?}")]
    BadPublicKey(String),
    /// A secret key file is not in the format `keygen` writes.
    #[error("not a tidepool secret key file: {0}")]
    BadSecretKey(String),
    /// The system random number generator failed.
    #[error("could not generate a key: the system random number generator failed")]
    Rng,
    /// A signature did not verify.
    #[error("signature does not verify for key {0}")]
    BadSignature(PublicKey),
    /// A key role's name is not one of the four.
    #[error("unknown key role {0:?} (publisher, pool, node, client)")]
    UnknownRole(String),
}

/// What a key is used for; recorded in its file so a node key is not used
/// by mistake to sign bundles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KeyRole {
    /// Signs job bundles (manifests).
    Publisher,
    /// Identifies a pool to its nodes and clients.
    Pool,
    /// Identifies a node and signs its receipts.
    Node,
    /// Identifies someone who submits jobs to a pool.
    Client,
}

impl KeyRole {
    /// The role's name as written in key files.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyRole::Publisher => "publisher",
            KeyRole::Pool => "pool",
            KeyRole::Node => "node",
            KeyRole::Client => "client",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "publisher" => KeyRole::Publisher,
            "pool" => KeyRole::Pool,
            "node" => KeyRole::Node,
            "client" => KeyRole::Client,
            _ => return None,
        })
    }
}

impl std::str::FromStr for KeyRole {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        KeyRole::parse(s).ok_or_else(|| KeyError::UnknownRole(s.to_owned()))
    }
}

/// An Ed25519 public key.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PublicKey(pub [u8; 32]);

impl PublicKey {
    /// Parse the text form `ed25519:<base64url>`.
    pub fn parse(s: &str) -> Result<Self, KeyError> {
        let bad = || KeyError::BadPublicKey(s.to_owned());
        let b64 = s.trim().strip_prefix("ed25519:").ok_or_else(bad)?;
        let bytes = URL_SAFE_NO_PAD.decode(b64).map_err(|_| bad())?;
        let arr: [u8; 32] = bytes.try_into().map_err(|_| bad())?;
        Ok(Self(arr))
    }

    /// Check `signature` over `tag || message`.
    pub fn verify(
        &self,
        tag: &[u8],
        message: &[u8],
        signature: &Signature,
    ) -> Result<(), KeyError> {
        let mut buf = Vec::with_capacity(tag.len() + message.len());
        buf.extend_from_slice(tag);
        buf.extend_from_slice(message);
        UnparsedPublicKey::new(&ED25519, &self.0)
            .verify(&buf, &signature.0)
            .map_err(|_| KeyError::BadSignature(*self))
    }

    /// A short form for logs and tables: the first 8 characters of the key.
    pub fn short(&self) -> String {
        let full = URL_SAFE_NO_PAD.encode(self.0);
        full[..8].to_owned()
    }
}

impl std::fmt::Display for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ed25519:{}", URL_SAFE_NO_PAD.encode(self.0))
    }
}

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self}")
    }
}

impl std::str::FromStr for PublicKey {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        Self::parse(s)
    }
}

impl Serialize for PublicKey {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for PublicKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        PublicKey::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// An Ed25519 signature (64 bytes).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Signature(pub [u8; 64]);

impl std::fmt::Debug for Signature {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Signature({}…)", hex::encode(&self.0[..8]))
    }
}

impl Serialize for Signature {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for Signature {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Signature;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("64 signature bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Signature, E> {
                let arr: [u8; 64] = v
                    .try_into()
                    .map_err(|_| E::invalid_length(v.len(), &self))?;
                Ok(Signature(arr))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Signature, A::Error> {
                let mut out = [0u8; 64];
                for (i, b) in out.iter_mut().enumerate() {
                    *b = seq
                        .next_element()?
                        .ok_or_else(|| serde::de::Error::invalid_length(i, &self))?;
                }
                Ok(Signature(out))
            }
        }
        d.deserialize_bytes(V)
    }
}

/// An Ed25519 key pair. Lives as long as the process that signs with it.
pub struct SecretKey {
    /// What the key is for (from its file).
    role: KeyRole,
    /// The PKCS#8 document, kept to write the key back out and to build TLS
    /// certificates from it.
    pkcs8: Vec<u8>,
    /// The parsed pair used for signing.
    pair: Ed25519KeyPair,
}

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretKey")
            .field("role", &self.role)
            .field("public", &self.public())
            .finish_non_exhaustive()
    }
}

impl Clone for SecretKey {
    fn clone(&self) -> Self {
        // The PKCS#8 bytes were parsed once already, so parsing them again cannot fail.
        Self::from_pkcs8(self.role, &self.pkcs8).expect("re-parse of a valid key")
    }
}

impl SecretKey {
    /// A new random key.
    pub fn generate(role: KeyRole, rng: &dyn ring::rand::SecureRandom) -> Result<Self, KeyError> {
        let doc = Ed25519KeyPair::generate_pkcs8(rng).map_err(|_| KeyError::Rng)?;
        Self::from_pkcs8(role, doc.as_ref())
    }

    /// A key from its PKCS#8 (v1 or v2) document.
    pub fn from_pkcs8(role: KeyRole, pkcs8: &[u8]) -> Result<Self, KeyError> {
        let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(pkcs8)
            .map_err(|e| KeyError::BadSecretKey(format!("bad PKCS#8 Ed25519 key: {e}")))?;
        Ok(Self {
            role,
            pkcs8: pkcs8.to_vec(),
            pair,
        })
    }

    /// A key derived from a 32-byte seed; for tests and simulations only.
    pub fn from_seed(role: KeyRole, seed: &[u8; 32]) -> Self {
        // PKCS#8 v1 wrapping of an Ed25519 seed (RFC 8410): fixed 16-byte prefix.
        let mut doc = vec![
            0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22,
            0x04, 0x20,
        ];
        doc.extend_from_slice(seed);
        Self::from_pkcs8(role, &doc).expect("a 32-byte seed always makes a valid key")
    }

    /// The key's role.
    pub fn role(&self) -> KeyRole {
        self.role
    }

    /// The public half.
    pub fn public(&self) -> PublicKey {
        let mut out = [0u8; 32];
        out.copy_from_slice(self.pair.public_key().as_ref());
        PublicKey(out)
    }

    /// The PKCS#8 document (secret!).
    pub fn pkcs8(&self) -> &[u8] {
        &self.pkcs8
    }

    /// Sign `tag || message`.
    pub fn sign(&self, tag: &[u8], message: &[u8]) -> Signature {
        let mut buf = Vec::with_capacity(tag.len() + message.len());
        buf.extend_from_slice(tag);
        buf.extend_from_slice(message);
        let sig = self.pair.sign(&buf);
        let mut out = [0u8; 64];
        out.copy_from_slice(sig.as_ref());
        Signature(out)
    }

    /// The text of a key file.
    pub fn to_text(&self) -> String {
        format!(
            "# tidepool secret key: keep this file private\nrole = \"{}\"\npublic = \"{}\"\npkcs8 = \"{}\"\n",
            self.role.as_str(),
            self.public(),
            STANDARD.encode(&self.pkcs8)
        )
    }

    /// Parse the text of a key file.
    pub fn from_text(text: &str) -> Result<Self, KeyError> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct File {
            role: String,
            public: String,
            pkcs8: String,
        }
        let f: File =
            toml::from_str(text).map_err(|e| KeyError::BadSecretKey(e.message().to_owned()))?;
        let role = KeyRole::parse(&f.role)
            .ok_or_else(|| KeyError::BadSecretKey(format!("unknown role {:?}", f.role)))?;
        let pkcs8 = STANDARD
            .decode(f.pkcs8.trim())
            .map_err(|_| KeyError::BadSecretKey("pkcs8 is not base64".into()))?;
        let key = Self::from_pkcs8(role, &pkcs8)?;
        let public = PublicKey::parse(&f.public)?;
        if public != key.public() {
            return Err(KeyError::BadSecretKey(format!(
                "the public key written in the file ({public}) is not the secret key's ({})",
                key.public()
            )));
        }
        Ok(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_verify_and_domain_separation() {
        let k = SecretKey::from_seed(KeyRole::Publisher, &[7; 32]);
        let sig = k.sign(MANIFEST_TAG, b"hello");
        k.public()
            .verify(MANIFEST_TAG, b"hello", &sig)
            .expect("verifies");
        assert!(k.public().verify(RECEIPT_TAG, b"hello", &sig).is_err());
        assert!(k.public().verify(MANIFEST_TAG, b"hellO", &sig).is_err());
        let other = SecretKey::from_seed(KeyRole::Publisher, &[8; 32]);
        assert!(other.public().verify(MANIFEST_TAG, b"hello", &sig).is_err());
    }

    #[test]
    fn text_round_trips_and_rejects_mismatch() {
        let rng = ring::rand::SystemRandom::new();
        let k = SecretKey::generate(KeyRole::Node, &rng).expect("generate");
        let back = SecretKey::from_text(&k.to_text()).expect("parse");
        assert_eq!(back.public(), k.public());
        assert_eq!(back.role(), KeyRole::Node);
        let pk = PublicKey::parse(&k.public().to_string()).expect("parse public");
        assert_eq!(pk, k.public());
        assert_eq!(k.public().to_string().len(), "ed25519:".len() + 43);

        let other = SecretKey::from_seed(KeyRole::Node, &[1; 32]);
        let forged = k
            .to_text()
            .replace(&k.public().to_string(), &other.public().to_string());
        let err = SecretKey::from_text(&forged).expect_err("mismatch");
        assert!(err.to_string().contains("is not the secret key's"), "{err}");
        assert!(PublicKey::parse("ed25519:abc").is_err());
        assert!(PublicKey::parse("rsa:AAAA").is_err());
    }
}
