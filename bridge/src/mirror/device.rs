//! Devices: a second machine of the same owner, linked so that the link works after the
//! owner went away.
//!
//! At link time the owner makes the device's key material itself — an ed25519 device
//! identity (derived from the link's secret, [`LinkSecret::device_key`], so that the
//! device can join a mirror's network as itself before it opens its bundle) and a fresh
//! X25519 [`SealKey`] — and certifies the device identity with
//! its own key ([`DeviceCert`]: owner, device, issued, expires). It puts the device's
//! keys, the certificate, its own seal key's secret (what opens the segments it already
//! pushed) and the mirrors to use into a [`KeyBundle`], and seals the bundle with age to
//! a one-time [`LinkSecret`] (an scrypt recipient whose passphrase is the secret: 256
//! random bits, so scrypt's stretching is set to its minimum). The sealed bundle waits
//! on a mirror under the secret's [`LinkSecret::address`] (a BLAKE3 derivation, so the
//! mirror learns nothing that opens it), counted against the owner's quota, until it is
//! taken once or expires. The secret travels only in the [`DeviceLink`]; whoever holds
//! the link can take and open the bundle, so the link is as secret as the keys.
//!
//! A certificate's bytes are fixed-size, big-endian, and pinned by a test below:
//!
//! ```text
//! offset size
//!      0    4  magic "PDC1" (Plait Device Certificate, version 1)
//!      4   32  owner: the owner's ed25519 public key
//!     36   32  device: the device's ed25519 public key
//!     68    8  issued_ms: u64, milliseconds since the Unix epoch
//!     76    8  expires_ms: u64, 0 for a certificate that does not expire
//!     84   64  ed25519 signature by the owner of SIGNING_DOMAIN || bytes 0..84
//! ```
//!
//! A link is `plait-device:` and the unpadded base64url of
//! `mirror(32) secret(32) expires_ms:u64 invite` (the rest: the mirror's invite link,
//! UTF-8, empty when the device is to be given a way in otherwise).
//!
//! Knows nothing of where a bundle is stored or of what a device does with its keys.

use std::io::{Read, Write};
use std::str::FromStr;

use age::secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use super::segment::{SealError, SealKey};
use crate::identity::{Identity, Keypair};

/// Length of an encoded certificate.
pub const CERT_LEN: usize = 148;
const SIGNED_LEN: usize = 84;
const MAGIC: &[u8; 4] = b"PDC1";
/// Prefixed to the signed bytes, so a certificate signature means nothing elsewhere.
const SIGNING_DOMAIN: &[u8] = b"plait/mirror/device-cert/1\n";
/// How a link starts.
pub const LINK_PREFIX: &str = "plait-device:";
/// The largest sealed bundle a mirror keeps (a bundle is a few hundred bytes).
pub const MAX_BUNDLE_BYTES: u64 = 64 << 10;
/// scrypt's work factor for the one-time secret: the passphrase is 256 random bits, so
/// stretching it would add nothing but time.
const SCRYPT_LOG_N: u8 = 10;

/// "`device` speaks for `owner`", signed by the owner (see the module doc for its bytes).
#[derive(Clone, PartialEq, Eq)]
pub struct DeviceCert {
    pub owner: Identity,
    pub device: Identity,
    pub issued_ms: u64,
    /// 0: does not expire.
    pub expires_ms: u64,
    signature: [u8; 64],
}

impl std::fmt::Debug for DeviceCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceCert")
            .field("owner", &self.owner)
            .field("device", &self.device)
            .field("issued_ms", &self.issued_ms)
            .field("expires_ms", &self.expires_ms)
            .finish_non_exhaustive()
    }
}

/// Why bytes or text are not a certificate, a link or a bundle, or a bundle does not open.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("a device certificate is {CERT_LEN} bytes, not {0}")]
    Length(usize),
    #[error("not a version 1 device certificate")]
    Magic,
    #[error("not an ed25519 public key")]
    Key,
    #[error("not a device link (plait-device:…)")]
    Link,
    #[error("the key bundle does not open with this link: {0}")]
    Open(String),
    #[error("the key bundle is malformed: {0}")]
    Bundle(String),
    #[error(transparent)]
    Seal(#[from] SealError),
}

impl DeviceCert {
    /// Certifies `device` as speaking for `owner`'s key.
    pub fn sign(owner: &Keypair, device: Identity, issued_ms: u64, expires_ms: u64) -> DeviceCert {
        let mut c = DeviceCert {
            owner: owner.identity(),
            device,
            issued_ms,
            expires_ms,
            signature: [0; 64],
        };
        c.signature = owner.sign(&signed_message(&c.signed_bytes()));
        c
    }

    /// Whether the owner signed it and it has not expired at `now_ms`.
    pub fn check(&self, now_ms: u64) -> bool {
        (self.expires_ms == 0 || now_ms < self.expires_ms)
            && self
                .owner
                .verify(&signed_message(&self.signed_bytes()), &self.signature)
                .is_ok()
    }

    fn signed_bytes(&self) -> [u8; SIGNED_LEN] {
        let mut b = [0u8; SIGNED_LEN];
        b[0..4].copy_from_slice(MAGIC);
        b[4..36].copy_from_slice(self.owner.as_bytes());
        b[36..68].copy_from_slice(self.device.as_bytes());
        b[68..76].copy_from_slice(&self.issued_ms.to_be_bytes());
        b[76..84].copy_from_slice(&self.expires_ms.to_be_bytes());
        b
    }

    /// The 148 bytes.
    pub fn to_bytes(&self) -> [u8; CERT_LEN] {
        let mut b = [0u8; CERT_LEN];
        b[..SIGNED_LEN].copy_from_slice(&self.signed_bytes());
        b[SIGNED_LEN..].copy_from_slice(&self.signature);
        b
    }

    /// Parses 148 bytes; the signature is not checked here (see [`DeviceCert::check`]).
    pub fn from_bytes(b: &[u8]) -> Result<DeviceCert, DeviceError> {
        if b.len() != CERT_LEN {
            return Err(DeviceError::Length(b.len()));
        }
        if &b[0..4] != MAGIC {
            return Err(DeviceError::Magic);
        }
        let key = |r: std::ops::Range<usize>| Identity::from_bytes(&b[r]).map_err(|_| DeviceError::Key);
        let u64_at = |i: usize| u64::from_be_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        let mut signature = [0u8; 64];
        signature.copy_from_slice(&b[SIGNED_LEN..]);
        Ok(DeviceCert {
            owner: key(4..36)?,
            device: key(36..68)?,
            issued_ms: u64_at(68),
            expires_ms: u64_at(76),
            signature,
        })
    }
}

fn signed_message(signed: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(SIGNING_DOMAIN.len() + signed.len());
    m.extend_from_slice(SIGNING_DOMAIN);
    m.extend_from_slice(signed);
    m
}

/// The one-time secret a link carries: it opens the bundle and names where it waits.
#[derive(Clone, PartialEq, Eq)]
pub struct LinkSecret([u8; 32]);

impl std::fmt::Debug for LinkSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LinkSecret(…)")
    }
}

impl LinkSecret {
    pub fn generate() -> LinkSecret {
        use rand::RngCore;
        let mut b = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut b);
        LinkSecret(b)
    }

    /// Where the sealed bundle waits on a mirror: tells nothing about the secret.
    pub fn address(&self) -> [u8; 32] {
        blake3::derive_key("plait 2026 device bundle address v1", &self.0)
    }

    /// The device's ed25519 key: derived from the secret, so that a device can join a
    /// mirror's network as itself before it holds its bundle.
    pub fn device_key(&self) -> Keypair {
        Keypair::from_secret_bytes(&blake3::derive_key("plait 2026 device identity v1", &self.0))
    }

    fn passphrase(&self) -> SecretString {
        SecretString::from(data_encoding::BASE64URL_NOPAD.encode(&self.0))
    }
}

/// What a device is given: its keys, the owner's word for them, and what it needs to read
/// the owner's segments.
#[derive(Serialize, Deserialize)]
pub struct KeyBundle {
    pub owner: Identity,
    /// The device's ed25519 seed (base64url).
    device_key: String,
    /// The device's own age X25519 secret (`AGE-SECRET-KEY-1…`).
    device_seal_key: String,
    /// The [`DeviceCert`], base64url.
    cert: String,
    /// The owner's seal key's secret: it opens the segments sealed before the link.
    owner_seal_key: String,
    /// The mirrors holding the owner's segments.
    pub mirrors: Vec<Identity>,
}

impl std::fmt::Debug for KeyBundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyBundle")
            .field("owner", &self.owner)
            .field("mirrors", &self.mirrors)
            .finish_non_exhaustive()
    }
}

impl KeyBundle {
    /// The bundle for a device whose keys are `device` and `device_seal`.
    pub fn new(
        cert: &DeviceCert,
        device: &Keypair,
        device_seal: &SealKey,
        owner_seal: &SealKey,
        mirrors: Vec<Identity>,
    ) -> KeyBundle {
        let b64 = |b: &[u8]| data_encoding::BASE64URL_NOPAD.encode(b);
        KeyBundle {
            owner: cert.owner,
            device_key: b64(&device.secret_bytes()),
            device_seal_key: device_seal.secret().expose_secret().to_string(),
            cert: b64(&cert.to_bytes()),
            owner_seal_key: owner_seal.secret().expose_secret().to_string(),
            mirrors,
        }
    }

    /// The device's key pair.
    pub fn device_key(&self) -> Result<Keypair, DeviceError> {
        let b = data_encoding::BASE64URL_NOPAD
            .decode(self.device_key.as_bytes())
            .map_err(|e| DeviceError::Bundle(e.to_string()))?;
        let seed: [u8; 32] = b
            .try_into()
            .map_err(|_| DeviceError::Bundle("a device key is 32 bytes".into()))?;
        Ok(Keypair::from_secret_bytes(&seed))
    }

    pub fn device_seal_key(&self) -> Result<SealKey, DeviceError> {
        SealKey::from_secret(&self.device_seal_key).map_err(|_| DeviceError::Bundle("device seal key".into()))
    }

    pub fn owner_seal_key(&self) -> Result<SealKey, DeviceError> {
        SealKey::from_secret(&self.owner_seal_key).map_err(|_| DeviceError::Bundle("owner seal key".into()))
    }

    pub fn cert(&self) -> Result<DeviceCert, DeviceError> {
        let b = data_encoding::BASE64URL_NOPAD
            .decode(self.cert.as_bytes())
            .map_err(|e| DeviceError::Bundle(e.to_string()))?;
        DeviceCert::from_bytes(&b)
    }

    /// Encrypts the bundle with age to `secret` (scrypt, one stanza).
    pub fn seal(&self, secret: &LinkSecret) -> Result<Vec<u8>, DeviceError> {
        let json = serde_json::to_vec(self).map_err(|e| DeviceError::Bundle(e.to_string()))?;
        let mut r = age::scrypt::Recipient::new(secret.passphrase());
        r.set_work_factor(SCRYPT_LOG_N);
        let enc = age::Encryptor::with_recipients(std::iter::once(&r as &dyn age::Recipient))
            .map_err(|e| SealError::Seal(e.to_string()))?;
        let mut out = Vec::with_capacity(json.len() + 256);
        let mut w = enc
            .wrap_output(&mut out)
            .map_err(|e| SealError::Seal(e.to_string()))?;
        w.write_all(&json)
            .and_then(|_| w.finish().map(drop))
            .map_err(|e| SealError::Seal(e.to_string()))?;
        Ok(out)
    }

    /// Opens a sealed bundle with the link's secret and checks that its certificate is
    /// the owner's word for its device key, valid at `now_ms`.
    pub fn open(secret: &LinkSecret, sealed: &[u8], now_ms: u64) -> Result<KeyBundle, DeviceError> {
        if sealed.len() as u64 > MAX_BUNDLE_BYTES {
            return Err(DeviceError::Open("larger than a bundle may be".into()));
        }
        let dec = age::Decryptor::new_buffered(sealed).map_err(|e| DeviceError::Open(e.to_string()))?;
        let mut id = age::scrypt::Identity::new(secret.passphrase());
        id.set_max_work_factor(SCRYPT_LOG_N);
        let mut r = dec
            .decrypt(std::iter::once(&id as &dyn age::Identity))
            .map_err(|e| DeviceError::Open(e.to_string()))?;
        let mut json = Vec::new();
        r.read_to_end(&mut json)
            .map_err(|e| DeviceError::Open(e.to_string()))?;
        let bundle: KeyBundle =
            serde_json::from_slice(&json).map_err(|e| DeviceError::Bundle(e.to_string()))?;
        let cert = bundle.cert()?;
        if cert.owner != bundle.owner || cert.device != bundle.device_key()?.identity() || !cert.check(now_ms)
        {
            return Err(DeviceError::Bundle(
                "its certificate is not the owner's word for its device key".into(),
            ));
        }
        Ok(bundle)
    }
}

/// What `plait device link` prints (see the module doc for its bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceLink {
    /// The mirror holding the sealed bundle.
    pub mirror: Identity,
    pub secret: LinkSecret,
    /// When the bundle stops being served (ms since the Unix epoch).
    pub expires_ms: u64,
    /// The mirror's invite link, for a device that is not yet a member of its network.
    pub invite: String,
}

impl std::fmt::Display for DeviceLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut b = Vec::with_capacity(72 + self.invite.len());
        b.extend_from_slice(self.mirror.as_bytes());
        b.extend_from_slice(&self.secret.0);
        b.extend_from_slice(&self.expires_ms.to_be_bytes());
        b.extend_from_slice(self.invite.as_bytes());
        write!(f, "{LINK_PREFIX}{}", data_encoding::BASE64URL_NOPAD.encode(&b))
    }
}

impl FromStr for DeviceLink {
    type Err = DeviceError;

    fn from_str(s: &str) -> Result<DeviceLink, DeviceError> {
        let b = s
            .trim()
            .strip_prefix(LINK_PREFIX)
            .and_then(|rest| data_encoding::BASE64URL_NOPAD.decode(rest.as_bytes()).ok())
            .filter(|b| b.len() >= 72)
            .ok_or(DeviceError::Link)?;
        let mut secret = [0u8; 32];
        secret.copy_from_slice(&b[32..64]);
        Ok(DeviceLink {
            mirror: Identity::from_bytes(&b[..32]).map_err(|_| DeviceError::Link)?,
            secret: LinkSecret(secret),
            expires_ms: u64::from_be_bytes(b[64..72].try_into().expect("8 bytes")),
            invite: String::from_utf8(b[72..].to_vec()).map_err(|_| DeviceError::Link)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn the_certificate_is_pinned() {
        let owner = Keypair::from_secret_bytes(&[7; 32]);
        let device = Keypair::from_secret_bytes(&[8; 32]).identity();
        let c = DeviceCert::sign(&owner, device, 1_700_000_000_000, 0);
        let b = c.to_bytes();
        // 00  50444331                 "PDC1"
        // 04  <owner, 32>
        // 24  <device, 32>
        // 44  0000018bcfe56800         issued_ms 1_700_000_000_000
        // 4c  0000000000000000         expires_ms: never
        // 54  <signature, 64>
        assert_eq!(hex(&b[..4]), "50444331");
        assert_eq!(&b[4..36], owner.identity().as_bytes());
        assert_eq!(&b[36..68], device.as_bytes());
        assert_eq!(hex(&b[68..84]), "0000018bcfe568000000000000000000");
        // ed25519 is deterministic: the signature is pinned too.
        assert_eq!(
            hex(&b[84..]),
            "d4f3d701497c147bedfe7936babea589cc3f19c9d1a8ac586e43c33ef884fe15\
             ae9b8862f1fc5d0637a55e597970ef56d183bcf4142f4789bf79ccbf2c3ceb07"
        );
        assert_eq!(DeviceCert::from_bytes(&b).unwrap(), c);
        assert!(c.check(u64::MAX));

        // Another key's signature, a changed field, an expired certificate: refused.
        let other = Keypair::from_secret_bytes(&[9; 32]);
        let mut forged = DeviceCert::sign(&other, device, 1_700_000_000_000, 0);
        forged.owner = owner.identity();
        assert!(!forged.check(0));
        let mut b2 = b;
        b2[75] ^= 1;
        assert!(!DeviceCert::from_bytes(&b2).unwrap().check(0));
        let expiring = DeviceCert::sign(&owner, device, 1, 1000);
        assert!(expiring.check(999) && !expiring.check(1000));
        assert!(matches!(
            DeviceCert::from_bytes(&b[..147]),
            Err(DeviceError::Length(147))
        ));
        let mut bad = b;
        bad[0] = b'X';
        assert!(matches!(DeviceCert::from_bytes(&bad), Err(DeviceError::Magic)));
    }

    #[test]
    fn a_bundle_opens_with_its_link_only() {
        let owner = Keypair::generate();
        let owner_seal = SealKey::generate();
        let device = Keypair::generate();
        let device_seal = SealKey::generate();
        let mirror = Keypair::generate().identity();
        let cert = DeviceCert::sign(&owner, device.identity(), 10, 0);
        let bundle = KeyBundle::new(&cert, &device, &device_seal, &owner_seal, vec![mirror]);
        let secret = LinkSecret::generate();
        let sealed = bundle.seal(&secret).unwrap();
        assert!(sealed.starts_with(b"age-encryption.org/v1\n"));
        assert!((sealed.len() as u64) < MAX_BUNDLE_BYTES);
        let text = String::from_utf8_lossy(&sealed);
        assert!(!text.contains("AGE-SECRET-KEY"));

        let opened = KeyBundle::open(&secret, &sealed, 11).unwrap();
        assert_eq!(opened.owner, owner.identity());
        assert_eq!(opened.mirrors, vec![mirror]);
        assert_eq!(opened.device_key().unwrap().identity(), device.identity());
        assert_eq!(opened.cert().unwrap(), cert);
        assert_eq!(
            opened.owner_seal_key().unwrap().recipient().to_string(),
            owner_seal.recipient().to_string()
        );
        assert_eq!(
            opened.device_seal_key().unwrap().recipient().to_string(),
            device_seal.recipient().to_string()
        );
        assert!(matches!(
            KeyBundle::open(&LinkSecret::generate(), &sealed, 11),
            Err(DeviceError::Open(_))
        ));
        // The address names the bundle without opening it.
        assert_ne!(secret.address(), secret.0);
        assert_eq!(secret.address(), secret.clone().address());
        assert_ne!(
            secret.device_key().identity(),
            LinkSecret::generate().device_key().identity()
        );
        assert_eq!(
            secret.device_key().identity(),
            secret.clone().device_key().identity()
        );

        // A bundle whose certificate is for another key is refused.
        let wrong = DeviceCert::sign(&owner, Keypair::generate().identity(), 10, 0);
        let sealed = KeyBundle::new(&wrong, &device, &device_seal, &owner_seal, vec![])
            .seal(&secret)
            .unwrap();
        assert!(matches!(
            KeyBundle::open(&secret, &sealed, 11),
            Err(DeviceError::Bundle(_))
        ));
    }

    #[test]
    fn the_link_is_pinned() {
        let link = DeviceLink {
            mirror: Keypair::from_secret_bytes(&[7; 32]).identity(),
            secret: LinkSecret([1; 32]),
            expires_ms: 0x0102,
            invite: "plait-invite:x".into(),
        };
        let text = link.to_string();
        assert!(text.starts_with(LINK_PREFIX));
        let b = data_encoding::BASE64URL_NOPAD
            .decode(&text.as_bytes()[LINK_PREFIX.len()..])
            .unwrap();
        // 00  <mirror, 32>
        // 20  0101…01                  the secret, 32
        // 40  0000000000000102         expires_ms
        // 48  706c6169742d…3a78        "plait-invite:x"
        assert_eq!(&b[..32], link.mirror.as_bytes());
        assert_eq!(&b[32..64], &[1; 32]);
        assert_eq!(hex(&b[64..72]), "0000000000000102");
        assert_eq!(&b[72..], b"plait-invite:x");
        assert_eq!(text.parse::<DeviceLink>().unwrap(), link);
        assert!(matches!(
            "plait-device:AAAA".parse::<DeviceLink>(),
            Err(DeviceError::Link)
        ));
        assert!(matches!(
            "plait-invite:x".parse::<DeviceLink>(),
            Err(DeviceError::Link)
        ));
    }
}
