import Testing

@testable import Stoker

@Suite("Connection strings")
struct ConnectionConfigurationTests {
    @Test("a URL is parsed by libpq and described without its password")
    func urlRedacted() throws {
        let configuration = try ConnectionConfiguration(
            "postgresql://svc:s3cr%40t-pw@db.internal:6543/app?sslmode=require&connect_timeout=4"
        )
        #expect(configuration.value(for: "host") == "db.internal")
        #expect(configuration.value(for: "port") == "6543")
        #expect(configuration.value(for: "dbname") == "app")
        #expect(configuration.value(for: "sslmode") == "require")
        #expect(configuration.value(for: "password") == "s3cr@t-pw")
        #expect(configuration.redactedDescription.contains("host=db.internal"))
        #expect(!configuration.redactedDescription.contains("s3cr"))
        #expect(configuration.secrets.contains("s3cr@t-pw"))
    }

    @Test("a key=value string keeps every libpq parameter, several hosts included")
    func keyValue() throws {
        let configuration = try ConnectionConfiguration(
            "host=a,b port=5432,5433 dbname='my db' user=svc password='it\\'s' target_session_attrs=read-write "
                + "keepalives_idle=5 tcp_user_timeout=3000"
        )
        #expect(configuration.value(for: "host") == "a,b")
        #expect(configuration.value(for: "target_session_attrs") == "read-write")
        #expect(configuration.value(for: "tcp_user_timeout") == "3000")
        #expect(configuration.value(for: "password") == "it's")
        #expect(!configuration.redactedDescription.contains("it's"))
        #expect(configuration.redactedDescription.contains("dbname='my db'"))
    }

    @Test("a default is added only where the string sets nothing: its connect_timeout wins over the default 10 s")
    func defaultsKeepTheString() throws {
        let defaults: [(keyword: String, value: String, environment: String?)] = [
            ("connect_timeout", "10", "STOKER_TEST_VARIABLE_NEVER_SET"),
            ("keepalives_idle", "5", nil),
        ]
        let set = try ConnectionConfiguration("host=h connect_timeout=2").addingDefaults(defaults)
        #expect(set.value(for: "connect_timeout") == "2")
        #expect(set.value(for: "keepalives_idle") == "5")
        #expect(set.options.filter { $0.keyword == "connect_timeout" }.count == 1)
        let unset = try ConnectionConfiguration("host=h").addingDefaults(defaults)
        #expect(unset.value(for: "connect_timeout") == "10")
        // What the user wrote is what a description shows.
        #expect(!unset.redactedDescription.contains("connect_timeout"))
    }

    @Test("an empty string is valid: libpq takes everything from PG* variables")
    func empty() throws {
        let configuration = try ConnectionConfiguration("")
        #expect(configuration.options.isEmpty)
    }

    @Test(
        "malformed strings give .invalidConnectionString and never echo the password",
        arguments: [
            "postgresql://user:hunter2%zzsecret@host/db",
            "postgresql://user:hunter2-secret@[::1/db",
            "host=x password='hunter2-secret",
            "host=x password=hunter2-secret bogus_key=1",
            "postgresql://user@host/db?password=hunter2-secret&nonsense=1",
            "dbname=x = password=hunter2-secret",
        ]
    )
    func malformed(conninfo: String) {
        do {
            _ = try ConnectionConfiguration(conninfo)
            Issue.record("\(conninfo) was accepted")
        } catch {
            #expect(error.code == .invalidConnectionString)
            #expect(!"\(error)".contains("hunter2"), "\(error)")
            #expect(!"\(error)".contains("secret"), "\(error)")
        }
    }

    /// Strings a reviewer built to slip a password past the redaction (each once leaked whole or in part).
    @Test(
        "no password, nor a piece of one, survives in an error or the description",
        arguments: [
            " postgresql://svc:S3cr3tPW@db/app",
            "postgresql+psycopg2://svc:S3cr3tPW@db/app",
            "postgres:/svc:S3cr3tPW@db/app",
            "jdbc:postgresql://svc:S3cr3tPW@db/app",
            "host=db password:S3cr3tPW",
            "host=db user=svc S3cr3tPW",
            "host=db PASSWORD=S3cr3tPW",
            "postgresql://svc:S3c?r3tPW%zz@db/app",
            "postgresql://svc:S3c/r3tPW@db:5432/app",
            "postgresql://svc:S3c@r3tPW@db/app",
            "dbname=postgresql://svc:S3cr3tPW@db/app",
            "dbname='host=x password=S3cr3tPW'",
            "host=db password = 'S3cr3tPW' user=svc",
            "postgresql://svc@db/app?password=S3cr3tPW",
        ]
    )
    func noLeak(conninfo: String) {
        var texts: [String] = []
        do {
            let configuration = try ConnectionConfiguration(conninfo)
            texts.append(configuration.redactedDescription)
            texts.append(configuration.redactor.scrub("FATAL: database \"\(conninfo)\" does not exist"))
        } catch {
            texts += [error.description, error.message, error.serverMessage ?? ""]
        }
        for text in texts {
            for fragment in ["S3cr3tPW", "r3tPW", "S3c"] {
                #expect(!text.contains(fragment), "\(fragment) leaked in: \(text)")
            }
        }
    }

    /// The second review's inputs: a `"` inside the password, a combining mark at its start.
    @Test(
        "a quote or a combining mark in the password does not let it through",
        arguments: [
            #"postgresql://u:ab"LEAKME@[::1]x/db"#,
            #"postgresql://u:pa"LEAKME@[host"#,
            #"postgresql://u:x"LEAKME%zz@host/db"#,
            #"postgresql://u@host/db?password=x"LEAKME%zz"#,
            #"host=db LEAK"ME"#,
            "host=/nonexistent dbname=postgresql://u:\u{301}LEAKME@h/db",
            "postgresql://u:LEAK@\u{301}ME@db/app",
            "postgresql://u:LEAK/\u{301}ME@db/app",
        ]
    )
    func quotesAndMarks(conninfo: String) {
        var texts: [String] = []
        do {
            let configuration = try ConnectionConfiguration(conninfo)
            texts.append(configuration.redactedDescription)
        } catch {
            texts += [error.description, error.serverMessage ?? ""]
        }
        for text in texts {
            #expect(!text.contains("LEAK"), "leaked in: \(text)")
            #expect(!text.contains("ME%zz"), "leaked in: \(text)")
        }
    }

    @Test("a parse error keeps the keywords it names and hides everything else it quotes")
    func parseErrorText() {
        #expect(
            ConnectionConfiguration.hidingQuotedText(#"missing "=" after "hunter2" in connection info string"#)
                == #"missing "=" after "…" in connection info string"#
        )
        #expect(
            ConnectionConfiguration.hidingQuotedText(#"invalid value for "sslmode": "x""#)
                == #"invalid value for "sslmode": "…""#
        )
        // A quote inside the secret must not end the hidden part early.
        #expect(
            ConnectionConfiguration.hidingQuotedText(#"invalid percent-encoded token: "x"LEAKME%zz""#)
                == #"invalid percent-encoded token: "…""#
        )
        #expect(!ConnectionConfiguration.hidingQuotedText("ungültiger Wert »geheim« für »port«").contains("geheim"))
    }

    @Test("a NUL byte is refused, not truncated")
    func nulByte() {
        #expect(throws: StokerError.self) { try ConnectionConfiguration("host=a\0 password=x") }
    }

    @Test("the redactor removes every secret, longest first")
    func redactor() {
        let redactor = Redactor(secrets: ["pw", "pw-long"])
        #expect(redactor.scrub("a pw-long b pw c") == "a *** b *** c")
    }

    @Test("errors print one safe description")
    func description() {
        let error = StokerError(
            .queryFailed,
            "PostgreSQL rejected the statement.",
            sqlState: "42P01",
            serverMessage: "relation \"x\" does not exist",
            connection: "host=h"
        )
        #expect(
            "\(error)"
                == "StokerError.queryFailed: PostgreSQL rejected the statement. — server said: relation \"x\" does "
                + "not exist [SQLSTATE 42P01] (connection: host=h)"
        )
    }
}

@Suite("Connect failures are sorted into codes")
struct ConnectFailureTests {
    @Test(
        arguments: [
            (
                "connection to server at \"127.0.0.1\", port 1 failed: timeout expired",
                StokerError.Code.connectionTimeout
            ),
            (
                "connection to server at \"127.0.0.1\", port 5432 failed: FATAL:  password authentication failed for "
                    + "user \"bob\"", .authenticationFailed
            ),
            (
                "connection to server on socket \"/tmp/x\" failed: FATAL:  role \"nobody\" does not exist",
                .authenticationFailed
            ),
            (
                "connection to server on socket \"/tmp/x\" failed: FATAL:  database \"nope\" does not exist",
                .databaseNotFound
            ),
            ("connection to server at \"localhost\" failed: root certificate file \"/x\" does not exist", .tlsFailed),
            (
                "connection to server at \"localhost\", port 5 failed: server certificate for \"localhost\" does not "
                    + "match host name \"127.0.0.1\"", .tlsFailed
            ),
            ("connection to server at \"h\", port 5 failed: session is read-only", .readOnlySession),
            ("invalid integer value \"x\" for connection option \"port\"", .invalidConnectionString),
            ("invalid sslmode value: \"sometimes\"", .invalidConnectionString),
            ("invalid port number: \"99999\"", .invalidConnectionString),
            (
                "connection to server at \"127.0.0.1\", port 1 failed: Connection refused\n\tIs the server running on "
                    + "that host and accepting TCP/IP connections?", .connectionFailed
            ),
        ]
    )
    func classify(message: String, code: StokerError.Code) {
        #expect(
            PGConnection.connectFailure(message, redactor: Redactor(secrets: []), connection: "host=h").code == code)
    }
}
