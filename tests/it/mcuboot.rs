//! MCUboot images against the real imgtool (PyPI, installed by scripts/test): fwrepo's image is
//! byte-identical to `imgtool sign` with the same key and options, `imgtool verify -k` accepts
//! it, and tampering or a wrong key is rejected. KEYHASH, which imgtool verify skips, is
//! checked here. Bad options store nothing.

use std::path::{Path, PathBuf};

use reqwest::StatusCode;
use serde_json::Value;
use sha2::Digest;

use crate::common::{have_tool, image, tool, TestServer};

struct Case {
    name: &'static str,
    /// Query options for fwrepo.
    query: &'static str,
    /// The same options for `imgtool sign`.
    args: &'static [&'static str],
    /// Whether the raw body leaves a zeroed header area (padHeader=false).
    zero_header: bool,
}

const CASES: &[Case] = &[
    Case {
        name: "sha256-defaults",
        query: "version=1.2.3%2B42",
        args: &["--version", "1.2.3+42", "-H", "0x200", "--pad-header", "--align", "4", "-S", "0"],
        zero_header: false,
    },
    Case {
        name: "sha256-counter-padded-confirmed",
        query: "version=2.0.1&securityCounter=auto&slotSize=0x40000&pad=true&confirm=true",
        args: &[
            "--version", "2.0.1", "-H", "0x200", "--pad-header", "--align", "4", "-S", "0x40000",
            "-s", "auto", "--pad", "--confirm",
        ],
        zero_header: false,
    },
    Case {
        name: "sha256-unpadded-header-align32",
        query: "version=0.9&headerSize=0x400&padHeader=false&align=32&slotSize=262144&pad=true&securityCounter=7",
        args: &[
            "--version", "0.9", "-H", "0x400", "--align", "32", "-S", "262144", "--pad", "-s", "7",
        ],
        zero_header: true,
    },
    Case {
        name: "sha512",
        query: "version=3.1.4&hash=sha512",
        args: &["--version", "3.1.4", "-H", "0x200", "--pad-header", "--align", "4", "-S", "0", "--sha", "512"],
        zero_header: false,
    },
    Case {
        name: "sha512-counter-padded",
        query: "version=3.1.4%2B9&hash=sha512&securityCounter=0x10&slotSize=0x40000&pad=true",
        args: &[
            "--version", "3.1.4+9", "-H", "0x200", "--pad-header", "--align", "4", "-S",
            "0x40000", "--sha", "512", "-s", "0x10", "--pad",
        ],
        zero_header: false,
    },
    Case {
        name: "pure",
        query: "version=1.0.0&hash=pure",
        args: &["--version", "1.0.0", "-H", "0x200", "--pad-header", "--align", "4", "-S", "0", "--pure"],
        zero_header: false,
    },
    Case {
        name: "pure-counter-padded",
        query: "version=1.0.0%2B1&hash=pure&securityCounter=auto&slotSize=0x40000&pad=true&align=8",
        args: &[
            "--version", "1.0.0+1", "-H", "0x200", "--pad-header", "--align", "8", "-S",
            "0x40000", "--pure", "-s", "auto", "--pad",
        ],
        zero_header: false,
    },
];

fn run(program: &Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{} runs: {e}", program.display()))
}

fn key_file(root: &Path) -> PathBuf {
    std::fs::read_dir(root.join("keys"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "pem"))
        .expect("a key file")
}

/// The unprotected TLVs of an image: (type, value).
fn tlvs(img: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let u16le = |at: usize| u16::from_le_bytes([img[at], img[at + 1]]) as usize;
    let hdr = u16le(8);
    let prot = u16le(10);
    let body = u32::from_le_bytes(img[12..16].try_into().unwrap()) as usize;
    let mut at = hdr + body + prot;
    assert_eq!(u16le(at), 0x6907, "TLV info magic");
    let end = at + u16le(at + 2);
    at += 4;
    let mut out = Vec::new();
    while at < end {
        let len = u16le(at + 2);
        out.push((img[at], img[at + 4..at + 4 + len].to_vec()));
        at += 4 + len;
    }
    out
}

fn verify(imgtool: &Path, key: &Path, img: &Path) -> (bool, String) {
    let out = run(
        imgtool,
        &["verify", "-k", key.to_str().unwrap(), img.to_str().unwrap()],
    );
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_to_imgtool_and_verified() {
    if !have_tool("imgtool") {
        return;
    }
    let imgtool = tool("imgtool").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(dir.path(), &[]).await;
    let key = key_file(dir.path());
    let keys: Value = srv.get("/v1/keys").await.json().await.unwrap();
    let key_id = keys["keys"][0]["keyId"].as_str().unwrap().to_owned();
    let pem = srv
        .get(&format!("/v1/keys/{key_id}"))
        .await
        .text()
        .await
        .unwrap();
    let public = dir.path().join("public.pem");
    std::fs::write(&public, &pem).unwrap();
    let der = srv
        .get(&format!("/v1/keys/{key_id}?format=der"))
        .await
        .bytes()
        .await
        .unwrap();

    for (i, case) in CASES.iter().enumerate() {
        let mut raw = image(150_000 + i * 997, i as u8);
        if case.zero_header {
            raw[..0x400].fill(0);
        }
        let raw_path = dir.path().join(format!("{}.bin", case.name));
        std::fs::write(&raw_path, &raw).unwrap();
        let name = format!("mcu-{}", case.name);
        let r = srv
            .put(
                &format!("/v1/firmware/{name}?format=mcuboot&{}", case.query),
                raw,
            )
            .await;
        assert_eq!(
            r.status(),
            StatusCode::CREATED,
            "{}: {}",
            case.name,
            r.text().await.unwrap()
        );
        let record: Value = r.json().await.unwrap();
        assert_eq!(record["format"], "mcuboot", "{}", case.name);
        assert_eq!(record["mcuboot"]["keyId"], key_id.as_str());
        let ours = srv.get(&format!("/fw/{name}")).await.bytes().await.unwrap();
        assert_eq!(record["size"], ours.len() as u64);

        let expected = dir.path().join(format!("{}.imgtool.bin", case.name));
        let mut args = vec!["sign", "-k", key.to_str().unwrap()];
        args.extend_from_slice(case.args);
        args.extend([raw_path.to_str().unwrap(), expected.to_str().unwrap()]);
        let out = run(&imgtool, &args);
        assert!(
            out.status.success(),
            "imgtool sign {}: {}",
            case.name,
            String::from_utf8_lossy(&out.stderr)
        );
        let theirs = std::fs::read(&expected).unwrap();
        assert_eq!(ours.len(), theirs.len(), "{}: length", case.name);
        if let Some(at) = ours.iter().zip(&theirs).position(|(a, b)| a != b) {
            panic!("{}: first difference at byte {at:#x}", case.name);
        }

        let ours_path = dir.path().join(format!("{}.fwrepo.bin", case.name));
        std::fs::write(&ours_path, &ours).unwrap();
        let (ok, said) = verify(&imgtool, &public, &ours_path);
        assert!(ok, "{}: imgtool verify: {said}", case.name);
        assert!(said.contains("Image was correctly validated"), "{said}");

        // KEYHASH: the hash of the SPKI DER the bootloader embeds, with the image's hash.
        let sha512 = case.query.contains("hash=sha512") || case.query.contains("hash=pure");
        let want = if sha512 {
            sha2::Sha512::digest(&der).to_vec()
        } else {
            sha2::Sha256::digest(&der).to_vec()
        };
        let tlvs = tlvs(&ours);
        let kinds: Vec<u8> = tlvs.iter().map(|(k, _)| *k).collect();
        let hash_kind = if sha512 { 0x12 } else { 0x10 };
        if case.query.contains("hash=pure") {
            assert_eq!(kinds, [hash_kind, 0x25, 0x01, 0x24], "{}", case.name);
        } else {
            assert_eq!(kinds, [hash_kind, 0x01, 0x24], "{}", case.name);
        }
        assert_eq!(tlvs[kinds.iter().position(|&k| k == 0x01).unwrap()].1, want);
        assert_eq!(
            record["mcuboot"]["imageHash"],
            hex::encode(&tlvs[0].1),
            "{}",
            case.name
        );

        // A changed body byte breaks the hash; a changed signature byte the signature.
        let mut tampered = ours.to_vec();
        tampered[0x200 + 10] ^= 1;
        let t = dir.path().join("tampered.bin");
        std::fs::write(&t, &tampered).unwrap();
        assert!(
            !verify(&imgtool, &public, &t).0,
            "{}: tampered body accepted",
            case.name
        );
        let mut tampered = ours.to_vec();
        let sig_at = {
            let hdr = u16::from_le_bytes([ours[8], ours[9]]) as usize;
            let prot = u16::from_le_bytes([ours[10], ours[11]]) as usize;
            let body = u32::from_le_bytes(ours[12..16].try_into().unwrap()) as usize;
            let tlv_len =
                u16::from_le_bytes([ours[hdr + body + prot + 2], ours[hdr + body + prot + 3]])
                    as usize;
            hdr + body + prot + tlv_len - 1
        };
        tampered[sig_at] ^= 0x80;
        std::fs::write(&t, &tampered).unwrap();
        assert!(
            !verify(&imgtool, &public, &t).0,
            "{}: tampered signature accepted",
            case.name
        );
    }

    // Another Ed25519 key does not verify fwrepo's image.
    let other = dir.path().join("other.pem");
    let out = run(
        &imgtool,
        &["keygen", "-k", other.to_str().unwrap(), "-t", "ed25519"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let some = dir.path().join(format!("{}.fwrepo.bin", CASES[0].name));
    let (ok, said) = verify(&imgtool, &other, &some);
    assert!(!ok, "wrong key accepted: {said}");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_key_exports_match_imgtool_getpub() {
    if !have_tool("imgtool") {
        return;
    }
    let imgtool = tool("imgtool").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let srv = TestServer::start(dir.path(), &[]).await;
    let key = key_file(dir.path());
    let keys: Value = srv.get("/v1/keys").await.json().await.unwrap();
    let key_id = keys["keys"][0]["keyId"].as_str().unwrap().to_owned();
    let get = |format: &'static str| {
        let srv = &srv;
        let key_id = &key_id;
        async move {
            let r = srv.get(&format!("/v1/keys/{key_id}?format={format}")).await;
            assert_eq!(r.status(), StatusCode::OK);
            let ct = r.headers()[reqwest::header::CONTENT_TYPE]
                .to_str()
                .unwrap()
                .to_owned();
            (ct, r.bytes().await.unwrap().to_vec())
        }
    };
    let getpub = |encoding: &str| {
        let out = run(
            &imgtool,
            &["getpub", "-k", key.to_str().unwrap(), "-e", encoding],
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    };
    let (ct, pem) = get("pem").await;
    assert_eq!(ct, "application/x-pem-file");
    assert_eq!(pem, getpub("pem"));
    let (_, der) = get("der").await;
    assert_eq!(der, getpub("raw"));
    let (ct, c) = get("c").await;
    assert!(ct.starts_with("text/x-c"));
    // Identical to imgtool's but for the first line, which says who generated it.
    let theirs = String::from_utf8(getpub("lang-c")).unwrap();
    let ours = String::from_utf8(c).unwrap();
    assert_eq!(
        ours.split_once('\n').unwrap().1,
        theirs.split_once('\n').unwrap().1
    );
    assert!(ours.starts_with("/* Generated by fwrepo"));

    let r = srv.get(&format!("/v1/keys/{key_id}?format=jwk")).await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let r = srv.get("/v1/keys/0000000000000000").await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "key-not-found");
    srv.stop().await;

    // The command line prints the same bytes.
    let exe = env!("CARGO_BIN_EXE_fwrepo");
    for (format, want) in [("pem", &pem), ("der", &der)] {
        let out = std::process::Command::new(exe)
            .args(["keys", "export", "--format", format, "--keys"])
            .arg(dir.path().join("keys"))
            .arg("--storage")
            .arg(dir.path().join("storage"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(&out.stdout, want, "keys export --format {format}");
    }
    let out = std::process::Command::new(exe)
        .args([
            "keys", "export", "--format", "c", "--key", &key_id, "--keys",
        ])
        .arg(dir.path().join("keys"))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8(out.stdout).unwrap(), ours);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_options_store_nothing() {
    let dir = tempfile::tempdir().unwrap();
    // What a crash mid-signing leaves in the spool is cleared at start-up.
    let spool = dir.path().join("storage/spool");
    std::fs::create_dir_all(&spool).unwrap();
    std::fs::write(spool.join("0123.part"), b"half an upload").unwrap();
    let srv = TestServer::start(dir.path(), &[]).await;
    assert_eq!(
        std::fs::read_dir(&spool).unwrap().count(),
        0,
        "spool cleared at start"
    );
    let body = image(4096, 3);
    let cases = [
        ("format=mcuboot", "invalid-mcuboot-option", "version"),
        (
            "format=mcuboot&version=256.0.0",
            "invalid-mcuboot-option",
            "version",
        ),
        (
            "format=mcuboot&version=1.0.0.0",
            "invalid-mcuboot-option",
            "version",
        ),
        (
            "format=mcuboot&version=1.0&padHeader=false",
            "mcuboot-header-overlap",
            "padHeader",
        ),
        (
            "format=mcuboot&version=1.0&slotSize=5000",
            "mcuboot-slot-too-small",
            "slotSize",
        ),
        (
            "format=mcuboot&version=1.0&pad=true",
            "invalid-mcuboot-option",
            "slotSize",
        ),
        (
            "format=mcuboot&version=1.0&headerSize=16",
            "invalid-mcuboot-option",
            "headerSize",
        ),
        (
            "format=mcuboot&version=1.0&align=3",
            "invalid-mcuboot-option",
            "align",
        ),
        (
            "format=mcuboot&version=1.0&hash=md5",
            "invalid-mcuboot-option",
            "hash",
        ),
        (
            "format=mcuboot&version=1.0&securityCounter=-1",
            "invalid-mcuboot-option",
            "securityCounter",
        ),
        (
            "format=mcuboot&version=1.0&confirm=yes",
            "invalid-mcuboot-option",
            "confirm",
        ),
        ("format=elf&version=1.0", "invalid-parameter", "format"),
        ("headerSize=0x200", "invalid-parameter", "format=mcuboot"),
    ];
    for (query, code, mentions) in cases {
        let r = srv
            .put(&format!("/v1/firmware/bad-mcu?{query}"), body.clone())
            .await;
        // A malformed parameter is 400; options that are each fine but cannot make an image
        // together are 422.
        let want = if query.starts_with("format=elf") {
            StatusCode::BAD_REQUEST
        } else {
            StatusCode::UNPROCESSABLE_ENTITY
        };
        assert_eq!(r.status(), want, "{query}");
        let e: Value = r.json().await.unwrap();
        assert_eq!(e["error"]["code"], code, "{query}: {e}");
        assert!(
            e["error"]["message"].as_str().unwrap().contains(mentions),
            "{query}: {e}"
        );
        assert_eq!(
            srv.get("/v1/firmware/bad-mcu").await.status(),
            StatusCode::NOT_FOUND
        );
    }
    assert!(srv.blob_files().is_empty(), "nothing stored");
    let spool = dir.path().join("storage/spool");
    assert_eq!(
        std::fs::read_dir(&spool).unwrap().count(),
        0,
        "spool emptied"
    );

    // The same raw body and options make the same image: the name is reused, not refused.
    let q = "/v1/firmware/same-mcu?format=mcuboot&version=1.0";
    assert_eq!(srv.put(q, body.clone()).await.status(), StatusCode::CREATED);
    assert_eq!(srv.put(q, body.clone()).await.status(), StatusCode::OK);
    let r = srv.put(&format!("{q}.1"), body.clone()).await;
    assert_eq!(r.status(), StatusCode::CONFLICT);
    // sha256 vouches for the bytes sent.
    let r = srv
        .put(
            &format!(
                "/v1/firmware/sum-mcu?format=mcuboot&version=1.0&sha256={}",
                "0".repeat(64)
            ),
            body.clone(),
        )
        .await;
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let r = srv
        .put(
            &format!(
                "/v1/firmware/sum-mcu?format=mcuboot&version=1.0&sha256={}",
                crate::common::sha256_hex(&body)
            ),
            body,
        )
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    srv.stop().await;
}
