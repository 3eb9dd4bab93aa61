"""Authentication passes through pgrelay to the server; SSL/GSS negotiation is declined."""

import psycopg
import pytest

from conftest import MD5_PASSWORD, MD5_USER, SCRAM_PASSWORD, SCRAM_USER


@pytest.mark.parametrize(
    "user,password", [(MD5_USER, MD5_PASSWORD), (SCRAM_USER, SCRAM_PASSWORD)], ids=["md5", "scram"]
)
def test_password_login_succeeds_with_correct_password(relay, user, password):
    with relay.connect(user=user, password=password) as c:
        assert c.execute("SELECT current_user, 1 + 1").fetchone() == (user, 2)


@pytest.mark.parametrize("user", [MD5_USER, SCRAM_USER], ids=["md5", "scram"])
def test_password_login_refused_with_wrong_password(relay, user):
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        relay.connect(user=user, password="wrong-password")
    # the relay keeps serving after a refused login
    with relay.connect() as c:
        assert c.execute("SELECT 1").fetchone() == (1,)


@pytest.mark.parametrize("user", [MD5_USER, SCRAM_USER], ids=["md5", "scram"])
def test_password_is_required_for_password_users(relay, user):
    # proves the server really asked for a password through the relay
    with pytest.raises(psycopg.OperationalError, match="no password supplied"):
        relay.connect(user=user, password="")


def test_scram_login_without_channel_binding(relay):
    with relay.connect(user=SCRAM_USER, password=SCRAM_PASSWORD, channel_binding="disable") as c:
        assert c.execute("SELECT current_user").fetchone() == (SCRAM_USER,)


def test_unknown_role_is_refused_by_the_server(relay):
    with pytest.raises(psycopg.OperationalError, match='role "no_such_role" does not exist'):
        relay.connect(user="no_such_role")


def test_unknown_database_is_refused_by_the_server(relay):
    with pytest.raises(psycopg.OperationalError, match='database "no_such_db" does not exist'):
        relay.connect(dbname="no_such_db")


def test_many_sequential_scram_logins(relay):
    for _ in range(20):
        with relay.connect(user=SCRAM_USER, password=SCRAM_PASSWORD) as c:
            assert c.execute("SELECT 1").fetchone() == (1,)


def test_sslmode_prefer_connects_without_ssl(relay):
    with relay.connect(sslmode="prefer") as c:
        assert c.pgconn.ssl_in_use is False
        assert c.execute("SELECT 'plain'").fetchone() == ("plain",)


def test_sslmode_prefer_with_password_login(relay):
    with relay.connect(sslmode="prefer", user=SCRAM_USER, password=SCRAM_PASSWORD) as c:
        assert c.execute("SELECT current_user").fetchone() == (SCRAM_USER,)


def test_sslmode_require_fails_with_ssl_not_supported(relay):
    with pytest.raises(psycopg.OperationalError, match="does not support SSL"):
        relay.connect(sslmode="require")
