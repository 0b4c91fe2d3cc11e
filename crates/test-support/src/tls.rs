//! Certificates made by the test (rcgen): a CA, a server certificate for
//! `localhost` and `127.0.0.1`, and a client certificate, as PEM files in a
//! temporary directory; and the TLS variants of the real servers: a
//! TLS-only `redis-server` and Postgres plus PgBouncer with TLS on.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};
use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair};

use crate::procs::{free_port, PgStack, RedisServer, TempDir};

/// PEM files of one test PKI.
#[derive(Debug)]
pub struct TestCerts {
    dir: TempDir,
}

impl TestCerts {
    /// A fresh CA and a server and a client certificate signed by it.
    pub fn generate() -> anyhow::Result<Self> {
        let dir = TempDir::new("certs")?;
        let ca_key = KeyPair::generate()?;
        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "flowgate test CA");
        let ca = ca.self_signed(&ca_key)?;
        std::fs::write(dir.path().join("ca.pem"), ca.pem())?;
        for (name, purpose) in [
            ("server", ExtendedKeyUsagePurpose::ServerAuth),
            ("client", ExtendedKeyUsagePurpose::ClientAuth),
        ] {
            let key = KeyPair::generate()?;
            let mut p =
                CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])?;
            p.distinguished_name.push(DnType::CommonName, name);
            p.extended_key_usages = vec![purpose];
            let cert = p.signed_by(&key, &ca, &ca_key)?;
            std::fs::write(dir.path().join(format!("{name}.pem")), cert.pem())?;
            std::fs::write(dir.path().join(format!("{name}.key")), key.serialize_pem())?;
        }
        Ok(TestCerts { dir })
    }

    /// The directory holding the files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The CA certificate.
    pub fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// The server certificate (`localhost`, `127.0.0.1`).
    pub fn server_cert(&self) -> PathBuf {
        self.dir.path().join("server.pem")
    }

    /// The server key.
    pub fn server_key(&self) -> PathBuf {
        self.dir.path().join("server.key")
    }

    /// The client certificate.
    pub fn client_cert(&self) -> PathBuf {
        self.dir.path().join("client.pem")
    }

    /// The client key.
    pub fn client_key(&self) -> PathBuf {
        self.dir.path().join("client.key")
    }

    /// The `redis-server` arguments of a TLS-only server on `port`
    /// (`--port 0`: no plaintext listener at all) that requires a client
    /// certificate when `client_auth`.
    pub fn redis_args(&self, port: u16, client_auth: bool) -> Vec<String> {
        let p = |p: PathBuf| p.display().to_string();
        [
            "--port".to_owned(),
            "0".to_owned(),
            "--tls-port".to_owned(),
            port.to_string(),
            "--tls-cert-file".to_owned(),
            p(self.server_cert()),
            "--tls-key-file".to_owned(),
            p(self.server_key()),
            "--tls-ca-cert-file".to_owned(),
            p(self.ca()),
            "--tls-auth-clients".to_owned(),
            if client_auth { "yes" } else { "no" }.to_owned(),
        ]
        .into()
    }
}

/// Starts a TLS-only `redis-server` with these certificates.
pub fn redis_tls(certs: &TestCerts, client_auth: bool) -> anyhow::Result<RedisServer> {
    let port = free_port()?;
    RedisServer::start_with(port, certs.redis_args(port, client_auth))
}

/// Turns TLS on in a running [`PgStack`] and makes it mandatory: Postgres
/// with `ssl=on` and only `hostssl` lines in `pg_hba.conf` (a reload, no
/// restart), PgBouncer with `client_tls_sslmode = require` towards clients
/// and `server_tls_sslmode = require` towards Postgres (restarted), both
/// with the test server certificate. A client that connects at all has
/// encrypted.
pub fn pg_enable_tls(pg: &mut PgStack, certs: &TestCerts) -> anyhow::Result<()> {
    // Postgres refuses a key readable by others, and both daemons run as
    // `postgres`: copy the files into the stack's directory, owned by it.
    let dir = pg.dir().to_owned();
    for (from, to) in [
        (certs.server_cert(), "tls.pem"),
        (certs.server_key(), "tls.key"),
        (certs.ca(), "tls-ca.pem"),
    ] {
        std::fs::copy(&from, dir.join(to)).with_context(|| format!("copy {}", from.display()))?;
    }
    let ok = Command::new("sh")
        .arg("-c")
        .arg("chown postgres:postgres \"$1\"/tls* && chmod 600 \"$1\"/tls.key")
        .arg("sh")
        .arg(&dir)
        .status()?
        .success();
    if !ok {
        bail!("chown of the TLS files");
    }
    let d = dir.display();
    pg.psql(
        &format!("ALTER SYSTEM SET ssl_cert_file = '{d}/tls.pem'"),
        "postgres",
    )?;
    pg.psql(
        &format!("ALTER SYSTEM SET ssl_key_file = '{d}/tls.key'"),
        "postgres",
    )?;
    pg.psql("ALTER SYSTEM SET ssl = on", "postgres")?;
    let hba_path = dir.join("data/pg_hba.conf");
    let hba: String = std::fs::read_to_string(&hba_path)?
        .lines()
        .map(|l| match l.strip_prefix("host ") {
            Some(rest) => format!("hostssl {rest}\n"),
            None => format!("{l}\n"),
        })
        .collect();
    std::fs::write(&hba_path, hba)?;
    pg.psql("SELECT pg_reload_conf()", "postgres")?;
    let ini_path = dir.join("pgbouncer.ini");
    let mut ini = std::fs::read_to_string(&ini_path)?;
    // The settings belong to the [pgbouncer] section, the last one of the
    // project's ini; appending keeps them there.
    ini.push_str(&format!(
        "\nclient_tls_sslmode = require\nserver_tls_sslmode = require\nclient_tls_cert_file = {d}/tls.pem\nclient_tls_key_file = {d}/tls.key\nclient_tls_ca_file = {d}/tls-ca.pem\n"
    ));
    std::fs::write(&ini_path, ini)?;
    pg.stop_bouncer();
    pg.start_bouncer()?;
    // Postgres applies `ssl` on reload asynchronously.
    for _ in 0..100 {
        if pg.psql("SHOW ssl", "postgres")? == "on" {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    bail!("postgres did not turn ssl on")
}
