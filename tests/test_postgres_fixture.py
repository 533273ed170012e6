"""tests/postgres.py: a real PostgreSQL server, reached by its Unix socket with a password,
that keeps its data across a restart and recovers from a crash."""

from twisted.trial.unittest import TestCase

from tests.postgres import started_postgres


class Fixture(TestCase):
    timeout = 60

    def test_the_password_is_needed_and_enough(self):
        import psycopg

        pg = started_postgres(self)
        self.assertNotIn(pg.password, pg.dsn)
        with pg.connect() as conn:
            self.assertEqual(conn.execute("SELECT 1, current_user, current_database()")
                             .fetchone(), (1, "nodepass", "nodepass"))
            self.assertEqual(conn.execute("SHOW listen_addresses").fetchone(), ("",))
        with self.assertRaises(psycopg.OperationalError):
            psycopg.connect(pg.dsn, password="", connect_timeout=10).close()
        with self.assertRaises(psycopg.OperationalError):
            psycopg.connect(pg.dsn, password=pg.password + "x", connect_timeout=10).close()

    def test_data_outlives_a_stop_and_a_crash(self):
        pg = started_postgres(self)
        with pg.connect() as conn:
            conn.execute("CREATE TABLE t (n int)")
            conn.execute("INSERT INTO t VALUES (1)")
        pg.stop()
        pg.start_again()
        with pg.connect() as conn:
            conn.execute("INSERT INTO t VALUES (2)")
            pid = pg.pid()
            pg.kill()  # with this connection open
        self.assertFalse(pg.running)
        pg.start_again()
        self.assertNotEqual(pg.pid(), pid)
        with pg.connect() as conn:
            self.assertEqual(conn.execute("SELECT n FROM t ORDER BY n").fetchall(),
                             [(1,), (2,)])
        self.assertIn("database system was interrupted", pg.log())
