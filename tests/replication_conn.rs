//! The replication connection against a real server: startup, IDENTIFY_SYSTEM, slots, errors.

use pgcarve::conninfo::ConnInfo;
use pgcarve::source::conn::ReplicationConn;
use pgcarve::tls::TlsConnector;

use crate::common::{clusters, fresh_db, unique};

async fn open(url: &str) -> ReplicationConn {
    let info = ConnInfo::parse(url).unwrap();
    let tls = TlsConnector::new(&info).unwrap();
    ReplicationConn::connect(&info, &tls).await.unwrap()
}

#[tokio::test]
async fn identify_system_over_tcp_and_socket() {
    let c = clusters();
    let db = fresh_db(&c.source, "ident").await;
    let mut conn = open(&c.source.url(&db)).await;
    let sys = conn.identify_system().await.unwrap();
    assert!(sys.system_id.parse::<u64>().is_ok());
    assert_eq!(sys.dbname, db);
    assert!(sys.xlogpos.0 > 0);
    conn.close().await;

    let mut conn = open(&c.source.socket_url(&db)).await;
    assert_eq!(conn.identify_system().await.unwrap().dbname, db);
}

#[tokio::test]
async fn creates_slot_and_reports_server_errors_with_sqlstate() {
    let c = clusters();
    let db = fresh_db(&c.source, "slot").await;
    let mut conn = open(&c.source.url(&db)).await;
    let slot = unique("s");
    let lsn = conn.create_logical_slot(&slot).await.unwrap();
    assert!(lsn.0 > 0);
    // A second slot of the same name: duplicate_object.
    let err = conn.create_logical_slot(&slot).await.unwrap_err();
    assert_eq!(err.code(), Some("42710"), "{err}");
    // The connection stays usable after an error.
    conn.identify_system().await.unwrap();
    conn.simple_query(&format!("DROP_REPLICATION_SLOT \"{slot}\""))
        .await
        .unwrap();
}

#[tokio::test]
async fn start_replication_error_leaves_the_connection_usable() {
    let c = clusters();
    let db = fresh_db(&c.source, "startfail").await;
    let mut conn = open(&c.source.url(&db)).await;
    let err = conn
        .start_replication("no_such_slot", pgcarve::lsn::Lsn::ZERO, &[])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some("42704"), "{err}");
    assert_eq!(conn.identify_system().await.unwrap().dbname, db);
}
