//! CoAP over DTLS (`coaps://`) with real peers: libcoap's coap-client built on OpenSSL and on
//! GnuTLS, each with a device's pre-shared key set through the API and trusting the server's
//! certificate, 1 KiB blocks and the default size, the SHA-256 of every download checked. A
//! wrong key and an unknown identity fail the handshake; a COAPS task runs end to end as the
//! session's device; a client certificate names its device; idle sessions go, and handshakes
//! beyond the limit wait. An in-process client (`fwrepo::coap::dtls::client`) drives the
//! frame-level cases.

use std::process::Output;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::common::{client, have_tool, image, sha256_hex, tool, TestServer};

const IDENTITY: &str = "meter-7-psk";
const KEY: &str = "a-secret-of-24-bytes-ok!";

struct Setup {
    dir: tempfile::TempDir,
    srv: TestServer,
    images: Vec<(String, usize, String)>,
}

async fn setup(sizes: &[usize]) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(dir.path(), &[]).await;
    let r = client()
        .put(srv.url("/v1/devices/meter-7/psk"))
        .json(&json!({"identity": IDENTITY, "key": hex::encode(KEY)}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["identity"], IDENTITY);
    assert!(v.get("key").is_none(), "the key is never answered back");
    let page: Value = srv.get("/v1/devices/meter-7").await.json().await.unwrap();
    assert_eq!(page["psk"]["identity"], IDENTITY);
    assert!(
        !page.to_string().contains(&hex::encode(KEY)),
        "nor shown: {page}"
    );
    let mut images = Vec::new();
    for (i, size) in sizes.iter().enumerate() {
        let name = format!("dtls-{i}.bin");
        let data = image(*size, i as u8 + 70);
        let r = srv.put(&format!("/v1/firmware/{name}"), data.clone()).await;
        assert_eq!(r.status(), StatusCode::CREATED);
        images.push((name, *size, sha256_hex(&data)));
    }
    Setup { dir, srv, images }
}

/// coap-client fetching `path` over DTLS with `identity` and `key`.
async fn coap_client(
    peer: &str,
    s: &Setup,
    path: &str,
    identity: &str,
    key: &str,
    extra: &[&str],
) -> (Output, Vec<u8>) {
    let out = s
        .dir
        .path()
        .join(format!("{}.{peer}.out", path.replace('/', "_")));
    let _ = std::fs::remove_file(&out);
    let addr = s.srv.coap_dtls.expect("DTLS listener on");
    let mut cmd = tokio::process::Command::new(tool(peer).unwrap());
    // A later -B (seconds to wait) overrides this one.
    cmd.args(["-m", "get", "-B", "60", "-u", identity, "-k", key])
        .args(extra)
        .arg("-o")
        .arg(&out)
        .arg(format!("coaps://{addr}{path}"))
        .kill_on_drop(true);
    let output = tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("{peer} {path} timed out"))
        .unwrap();
    (output, std::fs::read(&out).unwrap_or_default())
}

async fn downloads(peer: &str) {
    if !have_tool(peer) {
        return;
    }
    let s = setup(&[1 << 20, 16 << 20]).await;
    for extra in [&["-b", "1024"][..], &[][..]] {
        for (name, size, digest) in &s.images {
            let (output, got) =
                coap_client(peer, &s, &format!("/fw/{name}"), IDENTITY, KEY, extra).await;
            assert!(
                output.status.success(),
                "{peer} {extra:?} {name}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
            assert_eq!(got.len(), *size, "{peer} {extra:?} {name}");
            assert_eq!(&sha256_hex(&got), digest, "{peer} {extra:?} {name}");
        }
    }
    s.srv.stop().await;
}

#[tokio::test]
async fn coap_client_openssl_downloads_over_dtls_with_a_devices_psk() {
    downloads("coap-client-openssl").await;
}

#[tokio::test]
async fn coap_client_gnutls_downloads_over_dtls_with_a_devices_psk() {
    downloads("coap-client-gnutls").await;
}

#[tokio::test]
async fn a_wrong_key_or_an_unknown_identity_fails_the_handshake() {
    let peer = "coap-client-openssl";
    if !have_tool(peer) {
        return;
    }
    let s = setup(&[4096]).await;
    let path = format!("/fw/{}", s.images[0].0);
    // A client whose handshake fails keeps trying until it gives up: after 5 s here.
    let ((_, wrong_key), (_, unknown)) = tokio::join!(
        coap_client(
            peer,
            &s,
            &path,
            IDENTITY,
            "a-wrong-secret-24-bytes!",
            &["-B", "5"]
        ),
        coap_client(peer, &s, &path, "nobody", KEY, &["-B", "5"]),
    );
    assert!(
        wrong_key.is_empty(),
        "wrong key: {} bytes served",
        wrong_key.len()
    );
    assert!(
        unknown.is_empty(),
        "unknown identity: {} bytes served",
        unknown.len()
    );
    // The right pair still works, and another device's identity cannot be taken.
    let (output, got) = coap_client(peer, &s, &path, IDENTITY, KEY, &[]).await;
    assert!(output.status.success());
    assert_eq!(sha256_hex(&got), s.images[0].2);
    let r = client()
        .put(s.srv.url("/v1/devices/meter-8/psk"))
        .json(&json!({"identity": IDENTITY, "key": hex::encode("another-key-16by")}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CONFLICT);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "psk-identity-taken");
    s.srv.stop().await;
}

/// Sets `device`'s PSK through the API.
async fn set_psk(srv: &TestServer, device: &str, identity: &str, key: &str) {
    let r = client()
        .put(srv.url(&format!("/v1/devices/{device}/psk")))
        .json(&json!({"identity": identity, "key": hex::encode(key)}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
}

/// coap-client-openssl over DTLS as `identity`: (exit success, stdout and stderr).
async fn as_device(identity: &str, key: &str, args: &[&str]) -> (bool, String, Vec<u8>) {
    let mut cmd = tokio::process::Command::new(tool("coap-client-openssl").unwrap());
    cmd.args(["-B", "30", "-u", identity, "-k", key])
        .args(args)
        .kill_on_drop(true);
    let output = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("coap-client finishes")
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
        output.stdout,
    )
}

#[tokio::test]
async fn a_coaps_task_runs_end_to_end_as_the_sessions_device_and_no_other() {
    if !have_tool("coap-client-openssl") {
        return;
    }
    let f = crate::fota::Fota::start(&[]).await;
    let data = image(50_000, 9);
    f.upload("fw-dtls", &data, "").await;
    let dtls = f.srv.coap_dtls.unwrap();
    set_psk(&f.srv, "meter-7", IDENTITY, KEY).await;
    set_psk(&f.srv, "meter-8", "meter-8-psk", "another-key-16by").await;
    // meter-7 has a device token too: over plain CoAP its work request needs it.
    let r = client()
        .post(f.srv.url("/v1/devices/meter-7/token"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let id = f
        .schedule(
            "meter-7",
            json!({"name": "fw-dtls", "protocolType": "COAPS"}),
        )
        .await;

    // The session is meter-7: its work request needs no token.
    let (ok, err, out) = as_device(
        IDENTITY,
        KEY,
        &["-m", "get", &format!("coaps://{dtls}/fota/meter-7")],
    )
    .await;
    assert!(ok, "{err}");
    let work: Value = serde_json::from_slice(&out).unwrap_or_else(|_| panic!("{err}"));
    assert_eq!(work["fotaId"], id.as_str());
    let uri = work["packageUri"].as_str().unwrap().to_owned();
    assert!(uri.starts_with(&format!("coaps://{dtls}/p/{id}/")), "{uri}");
    // meter-8's session may not ask for meter-7's work or report on its task.
    let (_, _, out) = as_device(
        "meter-8-psk",
        "another-key-16by",
        &["-m", "get", &format!("coaps://{dtls}/fota/meter-7")],
    )
    .await;
    assert!(
        serde_json::from_slice::<Value>(&out).is_err(),
        "meter-8 got meter-7's work"
    );
    let report = format!("coaps://{dtls}/fota/{id}/report");
    as_device(
        "meter-8-psk",
        "another-key-16by",
        &[
            "-m",
            "post",
            "-t",
            "50",
            "-e",
            r#"{"state":0,"result":9}"#,
            &report,
        ],
    )
    .await;
    assert_eq!(f.status(&id).await["status"], "delivering");

    // Download through the package URI over DTLS, then report to success.
    let file = f.dir.path().join("dtls.out");
    let (ok, err, _) = as_device(
        IDENTITY,
        KEY,
        &[
            "-m",
            "get",
            "-b",
            "1024",
            "-o",
            file.to_str().unwrap(),
            &uri,
        ],
    )
    .await;
    assert!(ok, "{err}");
    assert_eq!(
        sha256_hex(&std::fs::read(&file).unwrap()),
        sha256_hex(&data)
    );
    for body in [
        r#"{"state":2,"result":0}"#,
        r#"{"state":3,"result":0}"#,
        r#"{"state":0,"result":1}"#,
    ] {
        let (ok, err, _) = as_device(
            IDENTITY,
            KEY,
            &["-m", "post", "-t", "50", "-e", body, &report],
        )
        .await;
        assert!(ok, "{err}");
    }
    assert_eq!(f.status(&id).await["status"], "succeeded");
    f.srv.stop().await;
}

/// Shakes hands with the listener over UDP as a PSK client.
async fn connect(
    socket: &tokio::net::UdpSocket,
    identity: &str,
    key: &str,
) -> fwrepo::coap::dtls::client::Client {
    let mut c = fwrepo::coap::dtls::client::Client::psk(identity, key.as_bytes()).unwrap();
    let mut incoming = Vec::new();
    for _ in 0..20 {
        let (out, _) = c.feed(std::mem::take(&mut incoming));
        if c.established {
            return c;
        }
        for d in out {
            socket.send(&d).await.unwrap();
        }
        let mut buf = vec![0u8; 2048];
        // Whatever the flight holds, datagram by datagram.
        while let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_millis(200), socket.recv(&mut buf)).await
        {
            incoming.push(buf[..n].to_vec());
        }
    }
    panic!("no DTLS session");
}

/// A GET for `path` as one confirmable CoAP message; the answer's code, if one comes within
/// `wait`.
async fn get_over(
    socket: &tokio::net::UdpSocket,
    c: &mut fwrepo::coap::dtls::client::Client,
    path: &str,
    message_id: u16,
    wait: Duration,
) -> Option<u8> {
    use fwrepo::coap::msg::{codes, opt, Message};
    use fwrepo::coap::udp::{encode, parse, Datagram, MsgType};
    let mut msg = Message::new(codes::GET, bytes::Bytes::from_static(b"\x01"));
    for seg in path.trim_start_matches('/').split('/') {
        msg.push(opt::URI_PATH, seg.as_bytes().to_vec());
    }
    let d = Datagram {
        mtype: MsgType::Con,
        message_id,
        msg,
    };
    for record in c.write(&encode(&d)) {
        socket.send(&record).await.unwrap();
    }
    let mut buf = vec![0u8; 2048];
    let n = tokio::time::timeout(wait, socket.recv(&mut buf))
        .await
        .ok()?
        .unwrap();
    let (_, data) = c.feed(vec![buf[..n].to_vec()]);
    data.first().map(|m| parse(m).unwrap().msg.code)
}

/// The line of `/metrics` for `name` (a gauge without labels).
async fn metric(srv: &TestServer, name: &str) -> String {
    let text = client()
        .get(srv.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let prefix = format!("{name} ");
    text.lines()
        .find(|l| l.starts_with(&prefix))
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test]
async fn a_new_handshake_replaces_a_session_and_an_idle_one_is_let_go() {
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(dir.path(), &["coap.idle_timeout=1s"]).await;
    set_psk(&srv, "meter-7", IDENTITY, KEY).await;
    let r = srv.put("/v1/firmware/tiny.bin", image(100, 1)).await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    socket.connect(srv.coap_dtls.unwrap()).await.unwrap();
    let mut c = connect(&socket, IDENTITY, KEY).await;
    let content = fwrepo::coap::msg::codes::CONTENT;
    let answer = get_over(&socket, &mut c, "/fw/tiny.bin", 1, Duration::from_secs(5)).await;
    assert_eq!(answer, Some(content));
    let held = crate::common::poll(
        async || metric(&srv, "fwrepo_dtls_sessions").await,
        |l| l == "fwrepo_dtls_sessions 1",
    )
    .await;
    assert_eq!(held, "fwrepo_dtls_sessions 1");
    // A new handshake from the address replaces its session: the old one's records get
    // nothing, the new one is served.
    let old = c;
    let mut c = connect(&socket, IDENTITY, KEY).await;
    let mut old = old;
    let stale = get_over(
        &socket,
        &mut old,
        "/fw/tiny.bin",
        7,
        Duration::from_millis(500),
    )
    .await;
    assert_eq!(stale, None);
    let answer = get_over(&socket, &mut c, "/fw/tiny.bin", 8, Duration::from_secs(5)).await;
    assert_eq!(answer, Some(content));
    // Idle past the timeout, the session goes; a record of it then gets nothing.
    let gone = crate::common::poll(
        async || metric(&srv, "fwrepo_dtls_sessions").await,
        |l| l == "fwrepo_dtls_sessions 0",
    )
    .await;
    assert_eq!(gone, "fwrepo_dtls_sessions 0");
    let late = get_over(
        &socket,
        &mut c,
        "/fw/tiny.bin",
        2,
        Duration::from_millis(500),
    )
    .await;
    assert_eq!(late, None);
    // A new handshake from the same address gets a new session.
    let mut c = connect(&socket, IDENTITY, KEY).await;
    let answer = get_over(&socket, &mut c, "/fw/tiny.bin", 3, Duration::from_secs(5)).await;
    assert_eq!(answer, Some(content));
    srv.stop().await;
}

/// Certificate mode: the server's certificate (the one coaps+tcp uses) with the ECDHE-ECDSA
/// suites, trusted by the client with `-R`; no pre-shared key.
async fn certificate_download(peer: &str) {
    if !have_tool(peer) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = crate::common::test_certificate(dir.path());
    let sets = [
        format!("coap.tls_cert={}", cert.display()),
        format!("coap.tls_key={}", key.display()),
    ];
    let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
    let srv = TestServer::start(dir.path(), &sets).await;
    let mut images = Vec::new();
    for (i, size) in [1usize << 20, 16 << 20].into_iter().enumerate() {
        let data = image(size, 77 + i as u8);
        let r = srv
            .put(&format!("/v1/firmware/cert-{i}.bin"), data.clone())
            .await;
        assert_eq!(r.status(), StatusCode::CREATED);
        images.push((format!("cert-{i}.bin"), data));
    }
    let addr = srv.coap_dtls.unwrap();
    for ((name, data), extra) in images
        .iter()
        .flat_map(|i| [(i, &["-b", "1024"][..]), (i, &[][..])])
    {
        let out = dir
            .path()
            .join(format!("{peer}.{name}.{}.out", extra.len()));
        let mut cmd = tokio::process::Command::new(tool(peer).unwrap());
        cmd.args(["-m", "get", "-B", "60", "-R"])
            .arg(&cert)
            .args(extra)
            .arg("-o")
            .arg(&out)
            .arg(format!("coaps://{addr}/fw/{name}"))
            .kill_on_drop(true);
        let output = tokio::time::timeout(Duration::from_secs(120), cmd.output())
            .await
            .expect("finishes")
            .unwrap();
        let got = std::fs::read(&out).unwrap_or_default();
        assert_eq!(
            sha256_hex(&got),
            sha256_hex(data),
            "{peer} {name} {extra:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    srv.stop().await;
}

#[tokio::test]
async fn coap_client_openssl_downloads_over_dtls_trusting_the_servers_certificate() {
    certificate_download("coap-client-openssl").await;
}

#[tokio::test]
async fn coap_client_gnutls_downloads_over_dtls_trusting_the_servers_certificate() {
    certificate_download("coap-client-gnutls").await;
}

/// Sends a client's two ClientHellos (the second with the cookie); whether the server
/// answered the second within `wait`.
async fn second_hello_answered(
    socket: &tokio::net::UdpSocket,
    c: &mut fwrepo::coap::dtls::client::Client,
    wait: Duration,
) -> bool {
    let mut buf = vec![0u8; 2048];
    let (first, _) = c.feed(Vec::new());
    for d in first {
        socket.send(&d).await.unwrap();
    }
    let n = tokio::time::timeout(Duration::from_secs(5), socket.recv(&mut buf))
        .await
        .expect("a HelloVerifyRequest")
        .unwrap();
    let (second, _) = c.feed(vec![buf[..n].to_vec()]);
    for d in second {
        socket.send(&d).await.unwrap();
    }
    tokio::time::timeout(wait, socket.recv(&mut buf))
        .await
        .is_ok()
}

#[tokio::test]
async fn handshakes_beyond_the_limit_wait_for_one_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(
        dir.path(),
        &[
            "coap.dtls_max_handshakes=1",
            "coap.dtls_handshake_timeout=1s",
        ],
    )
    .await;
    set_psk(&srv, "meter-7", IDENTITY, KEY).await;
    let dtls = srv.coap_dtls.unwrap();
    let (a, b) = (
        tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap(),
        tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap(),
    );
    a.connect(dtls).await.unwrap();
    b.connect(dtls).await.unwrap();
    let new_client = || fwrepo::coap::dtls::client::Client::psk(IDENTITY, KEY.as_bytes()).unwrap();
    // A starts a handshake and goes quiet; B's is refused while A's is in progress.
    assert!(second_hello_answered(&a, &mut new_client(), Duration::from_secs(5)).await);
    assert!(!second_hello_answered(&b, &mut new_client(), Duration::from_millis(500)).await);
    // Once A's handshake timed out, B gets its session.
    let idle = crate::common::poll(
        async || metric(&srv, "fwrepo_dtls_handshakes").await,
        |l| l == "fwrepo_dtls_handshakes 0",
    )
    .await;
    assert_eq!(idle, "fwrepo_dtls_handshakes 0");
    let mut c = connect(&b, IDENTITY, KEY).await;
    let r = srv.put("/v1/firmware/tiny.bin", image(100, 2)).await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let answer = get_over(&b, &mut c, "/fw/tiny.bin", 1, Duration::from_secs(5)).await;
    assert_eq!(answer, Some(fwrepo::coap::msg::codes::CONTENT));
    srv.stop().await;
}

/// A CA and a certificate it signs for `cn`, made with openssl in `dir`: (ca, cert, key).
fn device_certificate(dir: &std::path::Path, ca_name: &str, cn: &str) -> [std::path::PathBuf; 3] {
    let ca = dir.join(format!("{ca_name}.pem"));
    let ca_key = dir.join(format!("{ca_name}.key"));
    let cert = dir.join(format!("{cn}.{ca_name}.pem"));
    let key = dir.join(format!("{cn}.{ca_name}.key"));
    let csr = dir.join(format!("{cn}.csr"));
    let run = |args: Vec<std::ffi::OsString>| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .output()
            .expect("openssl runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    if !ca.exists() {
        let mut a: Vec<std::ffi::OsString> = vec!["req".into(), "-x509".into()];
        a.extend(ec.iter().map(Into::into));
        a.extend(["-days", "1", "-subj"].iter().map(Into::into));
        a.push(format!("/CN={ca_name}").into());
        a.extend([
            "-keyout".into(),
            ca_key.clone().into(),
            "-out".into(),
            ca.clone().into(),
        ]);
        run(a);
    }
    let mut a: Vec<std::ffi::OsString> = vec!["req".into()];
    a.extend(ec.iter().map(Into::into));
    a.push("-subj".into());
    a.push(format!("/CN={cn}").into());
    a.extend([
        "-keyout".into(),
        key.clone().into(),
        "-out".into(),
        csr.clone().into(),
    ]);
    run(a);
    run(vec![
        "x509".into(),
        "-req".into(),
        "-days".into(),
        "1".into(),
        "-in".into(),
        csr.into(),
        "-CA".into(),
        ca.clone().into(),
        "-CAkey".into(),
        ca_key.into(),
        "-CAcreateserial".into(),
        "-out".into(),
        cert.clone().into(),
    ]);
    [ca, cert, key]
}

#[tokio::test]
async fn a_client_certificate_makes_the_session_its_devices() {
    if !have_tool("coap-client-openssl") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (server_cert, server_key) = crate::common::test_certificate(dir.path());
    let [ca, meter9, meter9_key] = device_certificate(dir.path(), "device-ca", "meter-9");
    let [_, meter10, meter10_key] = device_certificate(dir.path(), "device-ca", "meter-10");
    let [_, stranger, stranger_key] = device_certificate(dir.path(), "other-ca", "meter-9");
    let sets = [
        format!("coap.tls_cert={}", server_cert.display()),
        format!("coap.tls_key={}", server_key.display()),
        format!("coap.dtls_client_ca={}", ca.display()),
    ];
    let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
    let srv = TestServer::start(dir.path(), &sets).await;
    let r = srv.put("/v1/firmware/fw-cert", image(3000, 5)).await;
    assert_eq!(r.status(), StatusCode::CREATED);
    // meter-9 has a device token: without a proof of identity its work is refused.
    let r = client()
        .post(srv.url("/v1/devices/meter-9/token"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let r = srv
        .post(
            "/v1/devices/meter-9/fota",
            &json!({"name": "fw-cert", "protocolType": "COAPS"}),
        )
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let id = r.json::<Value>().await.unwrap()["fotaId"]
        .as_str()
        .unwrap()
        .to_owned();
    let work = format!("coaps://{}/fota/meter-9", srv.coap_dtls.unwrap());
    let ask = async |cert: Option<(&std::path::Path, &std::path::Path)>| {
        let mut cmd = tokio::process::Command::new(tool("coap-client-openssl").unwrap());
        cmd.args(["-m", "get", "-B", "5", "-R"]).arg(&server_cert);
        if let Some((c, k)) = cert {
            cmd.arg("-c").arg(c).arg("-j").arg(k);
        }
        cmd.arg(&work).kill_on_drop(true);
        let out = cmd.output().await.unwrap();
        serde_json::from_slice::<Value>(&out.stdout).ok()
    };
    let got = ask(Some((&meter9, &meter9_key)))
        .await
        .expect("meter-9's work");
    assert_eq!(got["fotaId"], id.as_str());
    assert_eq!(
        ask(Some((&meter10, &meter10_key))).await,
        None,
        "meter-10's session"
    );
    assert_eq!(
        ask(Some((&stranger, &stranger_key))).await,
        None,
        "another CA"
    );
    assert_eq!(ask(None).await, None, "no certificate and no token");
    srv.stop().await;
}

#[tokio::test]
async fn aiocoap_over_tinydtls_downloads_with_a_devices_psk() {
    if !have_tool("aiocoap-client") {
        return;
    }
    // tinydtls takes keys of up to 16 bytes, and offers only TLS_PSK_WITH_AES_128_CCM_8.
    let key = "sixteen-byte-key";
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(dir.path(), &[]).await;
    set_psk(&srv, "meter-11", "meter-11-psk", key).await;
    let data = image(1 << 20, 33);
    let r = srv.put("/v1/firmware/tiny-dtls.bin", data.clone()).await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let base = format!("coaps://{}", srv.coap_dtls.unwrap());
    let credentials = dir.path().join("credentials.json");
    let dict = json!({ format!("{base}/*"): {"dtls": {
        "psk": {"ascii": key}, "client-identity": {"ascii": "meter-11-psk"}}}});
    std::fs::write(&credentials, dict.to_string()).unwrap();
    let mut cmd = tokio::process::Command::new(tool("aiocoap-client").unwrap());
    cmd.arg("--credentials")
        .arg(&credentials)
        .arg(format!("{base}/fw/tiny-dtls.bin"))
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .expect("aiocoap-client finishes")
        .unwrap();
    assert_eq!(
        sha256_hex(&out.stdout),
        sha256_hex(&data),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    srv.stop().await;
}
