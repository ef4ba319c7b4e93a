//! The browser/Node signer (`web/plait-sign.js`, run by Node through
//! `tests/clients/sign_vector.mjs`) and the server's verifier
//! (`plait_server::access::signature`) agree: what the JavaScript signs, Rust verifies, and a
//! tampered copy is refused; what Rust signs, the JavaScript signs to the same bytes.
//!
//! Needs Node.js 20 and `npm ci` run in `tests/clients` (`tests/run` does it).

use std::path::PathBuf;
use std::process::Command;

use http::{HeaderMap, HeaderName, HeaderValue, Method, Uri};
use plait_bridge::Keypair;
use plait_server::access::signature::{
    CONTENT_DIGEST, SIGNATURE, SIGNATURE_INPUT, SignatureError, check_content_digest, sign_request,
    target_uri, verify_request,
};
use serde_json::Value;

const SEED: [u8; 32] = [7; 32];
const CREATED: u64 = 1_700_000_000;
const NONCE: &str = "js-vector-nonce";

/// Runs `node tests/clients/<script> <args…>`; returns its standard output, or fails with
/// everything it printed.
fn node(script: &str, args: &[&str]) -> String {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/clients");
    assert!(
        dir.join("node_modules/@noble/ed25519").exists(),
        "{}/node_modules lacks @noble/ed25519: run `npm ci` there (tests/run does)",
        dir.display()
    );
    let out = Command::new("node")
        .arg(dir.join(script))
        .args(args)
        .current_dir(&dir)
        .output()
        .expect("node runs (Node.js 20 is needed for this test)");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "node {script} failed:\n{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// One request as `sign_vector.mjs` prints it, as a server would receive it.
struct Received {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Option<Vec<u8>>,
}

fn seed_hex() -> String {
    SEED.iter().map(|b| format!("{b:02x}")).collect()
}

/// The first line of node's output that holds a JSON object.
fn json_line(out: &str) -> Value {
    let line = out
        .lines()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| panic!("no JSON line in node's output:\n{out}"));
    serde_json::from_str(line).expect("sign_vector.mjs prints JSON")
}

fn requests() -> (String, Vec<Received>) {
    let seed_hex = seed_hex();
    let json = json_line(&node(
        "sign_vector.mjs",
        &[&seed_hex, &CREATED.to_string(), NONCE],
    ));
    let identity = json["identity"].as_str().expect("identity").to_owned();
    assert_eq!(json["identityOfPublicKey"].as_str(), Some(identity.as_str()));
    let requests = json["requests"]
        .as_array()
        .expect("requests")
        .iter()
        .map(|r| {
            let mut headers = HeaderMap::new();
            headers.insert(
                http::header::HOST,
                HeaderValue::from_str(r["host"].as_str().expect("host")).expect("host value"),
            );
            headers.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
            for (name, value) in r["headers"].as_object().expect("headers") {
                headers.insert(
                    HeaderName::from_bytes(name.as_bytes()).expect("header name"),
                    HeaderValue::from_str(value.as_str().expect("string")).expect("value"),
                );
            }
            Received {
                method: r["method"].as_str().expect("method").parse().expect("method"),
                uri: r["path"].as_str().expect("path").parse().expect("path"),
                headers,
                body: r["body"].as_str().map(|b| b.as_bytes().to_vec()),
            }
        })
        .collect();
    (identity, requests)
}

#[test]
fn javascript_signatures_verify_in_rust() {
    let (identity, requests) = requests();
    let key = Keypair::from_secret_bytes(&SEED);
    assert_eq!(
        identity,
        key.identity().to_string(),
        "identityOf gives Rust's text"
    );
    assert_eq!(requests.len(), 2);

    // The PUT: percent-encoded path, a query, a non-ASCII body.
    let put = &requests[0];
    assert_eq!(put.method, Method::PUT);
    let target = target_uri("http", &put.headers, &put.uri);
    assert_eq!(
        target,
        format!("http://127.0.0.1:8123/~{identity}/notes/caf%C3%A9%20list?draft=1&x=a%20b")
    );
    let body = put.body.as_deref().expect("the PUT has a body");
    let verified = verify_request(&put.method, &target, &put.headers, CREATED + 1, 60).expect("verifies");
    assert_eq!(verified.identity, key.identity());
    assert_eq!(verified.nonce, NONCE);
    assert_eq!(verified.expires, CREATED + 60);
    assert!(verified.covers_digest);
    check_content_digest(&put.headers, body).expect("the digest matches the body");

    // Tampered copies are refused.
    assert_eq!(
        check_content_digest(&put.headers, b"hello"),
        Err(SignatureError::DigestMismatch)
    );
    assert_eq!(
        verify_request(&Method::POST, &target, &put.headers, CREATED, 60),
        Err(SignatureError::BadSignature)
    );
    let other_path = target.replace("draft=1", "draft=0");
    assert_eq!(
        verify_request(&put.method, &other_path, &put.headers, CREATED, 60),
        Err(SignatureError::BadSignature)
    );
    let mut forged_digest = put.headers.clone();
    forged_digest.insert(
        CONTENT_DIGEST,
        HeaderValue::from_static("sha-256=:LPJNul+wow4m6DsqxbninhsWHlwfp0JecwQzYpOLmCQ=:"),
    );
    assert_eq!(
        verify_request(&put.method, &target, &forged_digest, CREATED, 60),
        Err(SignatureError::BadSignature)
    );
    let mut swapped = put.headers.clone();
    swapped.insert(SIGNATURE, requests[1].headers[SIGNATURE].clone());
    assert_eq!(
        verify_request(&put.method, &target, &swapped, CREATED, 60),
        Err(SignatureError::BadSignature)
    );
    assert_eq!(
        verify_request(&put.method, &target, &put.headers, CREATED + 61, 60),
        Err(SignatureError::Expired)
    );

    // The GET: no body, so no digest, and the verifier does not ask for one.
    let get = &requests[1];
    assert!(get.body.is_none());
    assert!(!get.headers.contains_key(CONTENT_DIGEST));
    let target = target_uri("http", &get.headers, &get.uri);
    let verified = verify_request(&get.method, &target, &get.headers, CREATED, 60).expect("GET");
    assert!(!verified.covers_digest);
    assert_eq!(verified.nonce, format!("{NONCE}-get"));
    let mut stripped = get.headers.clone();
    stripped.remove(SIGNATURE_INPUT);
    assert!(matches!(
        verify_request(&get.method, &target, &stripped, CREATED, 60),
        Err(SignatureError::Malformed(_))
    ));
}

/// ed25519 signatures are deterministic, so given the same key, time and nonce the two
/// signers must produce the same fields, byte for byte.
#[test]
fn rust_and_javascript_sign_the_same_bytes() {
    let key = Keypair::from_secret_bytes(&SEED);
    let url = format!("http://127.0.0.1:8123/~{}/notes/caf%C3%A9?x=1", key.identity());
    let body = "h\u{e9}llo \u{2713}";
    let mut headers = HeaderMap::new();
    sign_request(
        &key,
        &Method::PATCH,
        &url,
        &mut headers,
        Some(body.as_bytes()),
        CREATED,
        60,
    )
    .expect("signs");
    let nonce = verify_request(&Method::PATCH, &url, &headers, CREATED, 60)
        .expect("Rust verifies its own")
        .nonce;
    let request = serde_json::json!({ "method": "patch", "url": url, "body": body }).to_string();
    let json = json_line(&node(
        "sign_vector.mjs",
        &[&seed_hex(), &CREATED.to_string(), &nonce, &request],
    ));
    let js = json["headers"].as_object().expect("headers");
    assert_eq!(js.len(), 3, "{js:?}");
    for name in [CONTENT_DIGEST, SIGNATURE_INPUT, SIGNATURE] {
        assert_eq!(
            js[name.as_str()].as_str(),
            headers[&name].to_str().ok(),
            "{name} differs"
        );
    }
}
