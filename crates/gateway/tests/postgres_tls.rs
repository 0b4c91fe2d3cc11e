//! Postgres over TLS with certificates the test generates: a real
//! Postgres with `ssl=on` that accepts only `hostssl` connections, and a
//! real PgBouncer that requires TLS from clients. `flowgate migrate`
//! connects directly with `sslmode=verify-full`; a node reaches PgBouncer
//! with `sslmode=require`; plaintext and a certificate from another CA are
//! refused.

use flowgate_test_support::procs::{PgStack, RedisServer};
use flowgate_test_support::tls::{pg_enable_tls, TestCerts};
use flowgate_test_support::{http, TestNode};
use serde_json::Value;

async fn postgres_state(url: &str, redis: &RedisServer) -> String {
    let n = TestNode::start(&[("REDIS_URL", &redis.url()), ("DATABASE_URL", url)])
        .await
        .unwrap();
    let (_, body) = http(n.addr, "GET", "/health", &[], None).await.unwrap();
    let v: Value = serde_json::from_str(&body).unwrap();
    v["dependencies"]["postgres"]["state"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test]
async fn migrate_and_the_pool_use_tls_directly_and_through_pgbouncer() {
    let certs = TestCerts::generate().unwrap();
    let other = TestCerts::generate().unwrap();
    let mut pg = PgStack::start().unwrap();
    pg_enable_tls(&mut pg, &certs).unwrap();
    let ca = certs.ca().display().to_string();
    let direct = pg.direct_url();

    // Plaintext is refused by the server (hostssl only)...
    let e = flowgate_store::migrate(&format!("{direct}?sslmode=disable"))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("pg_hba"), "{e}");
    // ...a certificate the configured CA did not sign is refused by us...
    let e = flowgate_store::migrate(&format!(
        "{direct}?sslmode=verify-full&sslrootcert={}",
        other.ca().display()
    ))
    .await
    .unwrap_err();
    assert!(e.to_string().to_lowercase().contains("certificate"), "{e}");
    // ...and verify-full with the right CA migrates.
    let applied =
        flowgate_store::migrate(&format!("{direct}?sslmode=verify-full&sslrootcert={ca}"))
            .await
            .unwrap();
    assert!(!applied.is_empty());

    // Through PgBouncer, which requires TLS from its clients.
    let redis = RedisServer::start().unwrap();
    let bouncer = pg.bouncer_url();
    assert_eq!(
        postgres_state(&format!("{bouncer}?sslmode=require"), &redis).await,
        "up"
    );
    assert_eq!(
        postgres_state(
            &format!("{bouncer}?sslmode=verify-full&sslrootcert={ca}"),
            &redis
        )
        .await,
        "up"
    );
    assert_eq!(
        postgres_state(&format!("{bouncer}?sslmode=disable"), &redis).await,
        "down"
    );
}
