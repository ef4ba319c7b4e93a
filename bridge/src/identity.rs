//! Identities: ed25519 key pairs and the one text encoding of public keys.
//!
//! An [`Identity`] is a public key. It names an instance, an account partition or a remote
//! peer, and it is the root of that identity's namespace. Everywhere an identity is written
//! as text (URLs such as `/~<id>/path`, logs, the CLI, later DHT records) it uses
//! [z-base-32] without padding: 52 lowercase characters, the encoding pkarr uses for the same
//! purpose, chosen because it is URL-safe, case-insensitive in practice and avoids look-alike
//! characters.
//!
//! A [`Keypair`] holds the secret half. On disk it is a PKCS#8 PEM file with mode 0600; a
//! file that other users can read is refused rather than used, as ssh does.
//!
//! [z-base-32]: https://philzimmermann.com/docs/human-oriented-base-32-encoding.txt

use std::fmt;
use std::fs;
use std::io::Write;
use std::path::Path;
use std::str::FromStr;
use std::sync::LazyLock;

use data_encoding::{Encoding, Specification};
use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey};
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};

/// Length of an identity in bytes (an ed25519 public key).
pub const IDENTITY_LEN: usize = 32;
/// Length of an identity's text form.
pub const IDENTITY_TEXT_LEN: usize = 52;

static ZBASE32: LazyLock<Encoding> = LazyLock::new(|| {
    let mut spec = Specification::new();
    spec.symbols.push_str("ybndrfg8ejkmcpqxot1uwisza345h769");
    // Accept upper-case input too: people retype identities.
    spec.translate.from.push_str("YBNDRFGEJKMCPQXOTUWISZAH");
    spec.translate.to.push_str("ybndrfgejkmcpqxotuwisza");
    spec.translate.to.push('h');
    spec.encoding().expect("z-base-32 specification is valid")
});

/// Errors about identities and key files.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("an identity is {IDENTITY_TEXT_LEN} z-base-32 characters; got {0:?}")]
    Malformed(String),
    #[error("not a valid ed25519 public key")]
    InvalidKey,
    #[error("key file {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("key file {path} is not a PKCS#8 ed25519 private key: {reason}")]
    BadKeyFile { path: String, reason: String },
    #[error(
        "key file {path} can be read by other users (mode {mode:o}); run `chmod 600 {path}` and start again"
    )]
    TooOpen { path: String, mode: u32 },
    #[error("bad signature")]
    BadSignature,
}

/// A public key: the identity of an instance, account or peer, and the root of its namespace.
///
/// Kept as its 32 bytes, checked to be a valid key when made: every subscription, resource
/// key and caller holds identities, and the decompressed point (`VerifyingKey`, 192 bytes)
/// is needed only to verify a signature, where it is made again (a few microseconds beside
/// the verification's tens).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Identity([u8; IDENTITY_LEN]);

impl PartialOrd for Identity {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Identity {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.as_bytes().cmp(other.as_bytes())
    }
}

impl Identity {
    /// The identity from its 32 raw bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, IdentityError> {
        let arr: [u8; IDENTITY_LEN] = bytes.try_into().map_err(|_| IdentityError::InvalidKey)?;
        VerifyingKey::from_bytes(&arr)
            .map(|_| Identity(arr))
            .map_err(|_| IdentityError::InvalidKey)
    }

    /// The 32 raw bytes of the public key.
    pub fn as_bytes(&self) -> &[u8; IDENTITY_LEN] {
        &self.0
    }

    /// Checks that `signature` (64 bytes) was made over `message` by this identity's key.
    pub fn verify(&self, message: &[u8], signature: &[u8]) -> Result<(), IdentityError> {
        let sig = Signature::from_slice(signature).map_err(|_| IdentityError::BadSignature)?;
        // Valid when made (`from_bytes`, `Keypair::identity`).
        VerifyingKey::from_bytes(&self.0)
            .map_err(|_| IdentityError::InvalidKey)?
            .verify(message, &sig)
            .map_err(|_| IdentityError::BadSignature)
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&ZBASE32.encode(self.as_bytes()))
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Identity({self})")
    }
}

impl FromStr for Identity {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() != IDENTITY_TEXT_LEN {
            return Err(IdentityError::Malformed(s.chars().take(80).collect()));
        }
        let bytes = ZBASE32
            .decode(s.as_bytes())
            .map_err(|_| IdentityError::Malformed(s.to_string()))?;
        // 52 symbols carry 260 bits; the last 4 must be zero so each key has one spelling.
        if ZBASE32.encode(&bytes) != s.to_ascii_lowercase() {
            return Err(IdentityError::Malformed(s.to_string()));
        }
        Identity::from_bytes(&bytes)
    }
}

impl serde::Serialize for Identity {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Identity {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// An ed25519 key pair: the secret that lets an instance or account speak for its identity.
pub struct Keypair(SigningKey);

impl Keypair {
    /// A fresh key pair from the operating system's random source.
    pub fn generate() -> Self {
        Keypair(SigningKey::generate(&mut rand::rngs::OsRng))
    }

    /// The key pair whose secret is these 32 bytes (an ed25519 seed).
    pub fn from_secret_bytes(secret: &[u8; 32]) -> Self {
        Keypair(SigningKey::from_bytes(secret))
    }

    /// The 32-byte secret seed, for handing the same key to another library (libp2p).
    pub fn secret_bytes(&self) -> [u8; 32] {
        self.0.to_bytes()
    }

    /// A key pair derived from this one for `purpose` (HKDF-SHA256 over the secret), e.g.
    /// an account's namespace key. The same secret and purpose always give the same key;
    /// the derived key reveals nothing about this one.
    pub fn derive(&self, purpose: &str) -> Keypair {
        let hk = hkdf::Hkdf::<sha2::Sha256>::new(Some(b"plait derived key v1"), &self.0.to_bytes());
        let mut seed = [0u8; 32];
        hk.expand(purpose.as_bytes(), &mut seed)
            .expect("32 bytes is a valid HKDF output length");
        Keypair::from_secret_bytes(&seed)
    }

    /// The public half.
    pub fn identity(&self) -> Identity {
        Identity(self.0.verifying_key().to_bytes())
    }

    /// Signs `message`; the result is 64 bytes.
    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.0.sign(message).to_bytes()
    }

    /// Loads the key pair stored at `path`, or makes one and stores it there (mode 0600) when
    /// the file does not exist yet. Returns the key pair and whether it was created.
    pub fn load_or_create(path: &Path) -> Result<(Self, bool), IdentityError> {
        match Self::load(path) {
            Ok(k) => Ok((k, false)),
            Err(IdentityError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                let k = Self::generate();
                k.save(path)?;
                Ok((k, true))
            }
            Err(e) => Err(e),
        }
    }

    /// Loads a PKCS#8 PEM key file, refusing one that others can read.
    pub fn load(path: &Path) -> Result<Self, IdentityError> {
        let shown = path.display().to_string();
        let io = |source| IdentityError::Io {
            path: shown.clone(),
            source,
        };
        let meta = fs::metadata(path).map_err(io)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(IdentityError::TooOpen {
                    path: shown.clone(),
                    mode,
                });
            }
        }
        #[cfg(not(unix))]
        let _ = meta;
        let pem = fs::read_to_string(path).map_err(io)?;
        SigningKey::from_pkcs8_pem(&pem)
            .map(Keypair)
            .map_err(|e| IdentityError::BadKeyFile {
                path: shown,
                reason: e.to_string(),
            })
    }

    /// Writes the key as PKCS#8 PEM to `path`, created with mode 0600 (never wider, even for
    /// an instant), replacing the file atomically.
    pub fn save(&self, path: &Path) -> Result<(), IdentityError> {
        let shown = path.display().to_string();
        let io = |source| IdentityError::Io {
            path: shown.clone(),
            source,
        };
        let pem = self
            .0
            .to_pkcs8_pem(Default::default())
            .map_err(|e| IdentityError::BadKeyFile {
                path: shown.clone(),
                reason: e.to_string(),
            })?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir).map_err(io)?;
        }
        let tmp = path.with_extension("tmp");
        let mut opts = fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let mut f = opts.open(&tmp).map_err(io)?;
        f.write_all(pem.as_bytes()).map_err(io)?;
        f.sync_all().map_err(io)?;
        fs::rename(&tmp, path).map_err(io)?;
        Ok(())
    }
}

impl fmt::Debug for Keypair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Keypair({})", self.identity())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_form_round_trips_and_is_52_lowercase_chars() {
        for _ in 0..50 {
            let id = Keypair::generate().identity();
            let s = id.to_string();
            assert_eq!(s.len(), IDENTITY_TEXT_LEN);
            assert!(s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()));
            assert_eq!(s.parse::<Identity>().unwrap(), id);
            assert_eq!(s.to_uppercase().parse::<Identity>().unwrap(), id);
        }
    }

    #[test]
    fn known_key_has_a_fixed_spelling() {
        // RFC 8032 test vector 1: this pins the alphabet and the bit order (the expected text was
        // computed independently with Python: base64.b32encode mapped onto the z-base-32 alphabet).
        let secret = [
            0x9d, 0x61, 0xb1, 0x9d, 0xef, 0xfd, 0x5a, 0x60, 0xba, 0x84, 0x4a, 0xf4, 0x92, 0xec, 0x2c, 0xc4,
            0x44, 0x49, 0xc5, 0x69, 0x7b, 0x32, 0x69, 0x19, 0x70, 0x3b, 0xac, 0x03, 0x1c, 0xae, 0x7f, 0x60,
        ];
        let id = Keypair::from_secret_bytes(&secret).identity();
        assert_eq!(
            hex(id.as_bytes()),
            "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"
        );
        assert_eq!(
            id.to_string(),
            "47pjoycnsrfmxikm95jh13y88e8qnhzu5kungjpxyepgt7a8krpy"
        );
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn derived_keys_are_stable_and_distinct() {
        let k = Keypair::from_secret_bytes(&[7; 32]);
        let a = k.derive("account/1");
        assert_eq!(a.identity(), k.derive("account/1").identity());
        assert_ne!(a.identity(), k.derive("account/2").identity());
        assert_ne!(a.identity(), k.identity());
        assert_ne!(
            a.identity(),
            Keypair::from_secret_bytes(&[8; 32])
                .derive("account/1")
                .identity()
        );
        let sig = a.sign(b"m");
        assert!(a.identity().verify(b"m", &sig).is_ok());
    }

    #[test]
    fn malformed_text_is_refused() {
        let good = Keypair::generate().identity().to_string();
        assert!("".parse::<Identity>().is_err());
        assert!(good[1..].parse::<Identity>().is_err());
        assert!(format!("{good}y").parse::<Identity>().is_err());
        // 'l' and 'v' are not in the z-base-32 alphabet.
        let bad: String = format!("l{}", &good[1..]);
        assert!(bad.parse::<Identity>().is_err());
    }

    #[test]
    fn an_identity_is_its_32_bytes_and_only_a_valid_key_is_one() {
        // Held by every subscription, caller and resource key: no decompressed point.
        assert_eq!(std::mem::size_of::<Identity>(), IDENTITY_LEN);
        let id = Keypair::generate().identity();
        assert_eq!(Identity::from_bytes(id.as_bytes()).unwrap(), id);
        // Not every 32 bytes are a point on the curve.
        let not_a_point = (0u8..=255)
            .map(|b| [b; IDENTITY_LEN])
            .find(|a| VerifyingKey::from_bytes(a).is_err())
            .expect("some 32 repeated bytes are not a point");
        assert!(matches!(
            Identity::from_bytes(&not_a_point),
            Err(IdentityError::InvalidKey)
        ));
        assert!(Identity::from_bytes(&[1; 31]).is_err());
    }

    #[test]
    fn signatures_verify_only_for_the_signer_and_message() {
        let k = Keypair::generate();
        let sig = k.sign(b"hello");
        assert!(k.identity().verify(b"hello", &sig).is_ok());
        assert!(k.identity().verify(b"hellO", &sig).is_err());
        assert!(Keypair::generate().identity().verify(b"hello", &sig).is_err());
        assert!(k.identity().verify(b"hello", &sig[..10]).is_err());
    }

    #[test]
    fn key_file_is_created_0600_and_loads_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/identity.pem");
        let (k1, created) = Keypair::load_or_create(&path).unwrap();
        assert!(created);
        let (k2, created) = Keypair::load_or_create(&path).unwrap();
        assert!(!created);
        assert_eq!(k1.identity(), k2.identity());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
    }

    #[cfg(unix)]
    #[test]
    fn key_file_readable_by_others_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("identity.pem");
        Keypair::generate().save(&path).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(Keypair::load(&path), Err(IdentityError::TooOpen { .. })));
    }

    #[test]
    fn garbage_key_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("identity.pem");
        Keypair::generate().save(&path).unwrap();
        fs::write(&path, "not a key").unwrap();
        assert!(matches!(
            Keypair::load(&path),
            Err(IdentityError::BadKeyFile { .. })
        ));
    }
}
