//! A self-signed certificate for `127.0.0.1` and `localhost`, made in the test and written to
//! a folder of its own, for servers that terminate TLS themselves.

use std::path::PathBuf;

pub struct TestCertificate {
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    /// The certificate in PEM, for clients to trust.
    pub pem: String,
}

impl TestCertificate {
    pub fn new() -> Self {
        let certified = rcgen::generate_simple_self_signed(vec![
            "127.0.0.1".to_owned(),
            "localhost".to_owned(),
        ])
        .expect("a self-signed certificate");
        let directory = std::env::temp_dir().join(format!(
            "resync-tls-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&directory).expect("certificate folder");
        let cert_path = directory.join("cert.pem");
        let key_path = directory.join("key.pem");
        let pem = certified.cert.pem();
        std::fs::write(&cert_path, &pem).expect("write cert");
        std::fs::write(&key_path, certified.signing_key.serialize_pem()).expect("write key");
        Self {
            cert_path,
            key_path,
            pem,
        }
    }
}

impl Default for TestCertificate {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestCertificate {
    fn drop(&mut self) {
        if let Some(directory) = self.cert_path.parent() {
            let _ = std::fs::remove_dir_all(directory);
        }
    }
}
