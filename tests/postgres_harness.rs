//! The PostgreSQL harness itself: a cluster of our own keeps committed rows across a
//! clean restart and a crash, reports down when stopped, serves the application role
//! with its password, and hands out separate databases.

mod common;

use common::postgres::Postgres;

#[test]
fn cluster_stops_restarts_and_recovers() {
    let Some(pg) = Postgres::start() else { return };
    assert!(pg.is_up());
    assert!(
        pg.url()
            .ends_with(&format!("@127.0.0.1:{}/smsauth", pg.port()))
    );

    // As the application role, over TCP with its password, in a database it owns.
    pg.psql_url(
        &pg.url(),
        "CREATE TABLE kept (id int PRIMARY KEY, note text);\n\
         INSERT INTO kept VALUES (1, 'before restart');",
    );
    assert_eq!(
        pg.psql("smsauth", "SELECT note FROM kept"),
        "before restart"
    );

    pg.restart();
    assert!(pg.is_up());
    assert_eq!(
        pg.psql("smsauth", "SELECT note FROM kept"),
        "before restart"
    );

    pg.stop();
    assert!(!pg.is_up());
    pg.start_again();
    assert!(pg.is_up());

    // Committed just before the crash: synchronous_commit and fsync are on.
    pg.psql("smsauth", "INSERT INTO kept VALUES (2, 'before crash')");
    pg.kill();
    assert!(!pg.is_up());
    pg.start_again();
    assert!(pg.is_up());
    assert_eq!(
        pg.psql("smsauth", "SELECT id || ':' || note FROM kept ORDER BY id"),
        "1:before restart\n2:before crash"
    );
    assert!(
        pg.log().contains("database system was interrupted"),
        "{}",
        pg.log()
    );
}

#[test]
fn new_database_is_fresh_and_owned_by_the_app_role() {
    let Some(pg) = Postgres::shared() else { return };
    let a = pg.new_database();
    let b = pg.new_database();
    assert_ne!(a, b);
    let name = |url: &str| url.rsplit('/').next().unwrap().to_owned();
    for url in [&a, &b] {
        assert_eq!(
            pg.psql(
                "postgres",
                &format!(
                    "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = '{}'",
                    name(url)
                )
            ),
            "smsauth"
        );
        // Empty, and the role may create tables in public (PostgreSQL 15 lets only the
        // owner do that).
        assert_eq!(
            pg.psql_url(
                url,
                "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
            ),
            "0"
        );
        pg.psql_url(url, "CREATE TABLE t (x int)");
    }
    assert_eq!(Postgres::shared().unwrap().port(), pg.port());
}
