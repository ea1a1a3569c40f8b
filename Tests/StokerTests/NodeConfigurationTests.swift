import Testing

@testable import Stoker

/// Configuration checks done when a ``StokerNode`` (or an ``Activator``) is created. Creating a node never connects,
/// so none of these tests needs a database.
@Suite("Node configuration")
struct NodeConfigurationTests {
    /// A configuration every case starts from: valid as it stands (see `defaultIsValid`).
    static func base() -> StokerNode.Configuration {
        StokerNode.Configuration(connection: "host=localhost dbname=app", cluster: "billing", nodeName: "node-a")
    }

    /// The error creating a node with `configuration` throws, or `nil` when it succeeds.
    static func constructionError(_ configuration: StokerNode.Configuration) -> StokerError? {
        do {
            _ = try StokerNode(configuration: configuration)
            return nil
        } catch {
            return error
        }
    }

    /// One value that must be refused.
    struct Rejected: Sendable, CustomTestStringConvertible {
        let label: String
        let code: StokerError.Code
        /// The field's name, as the message must spell it.
        let field: String
        let change: @Sendable (inout StokerNode.Configuration) -> Void

        init(
            _ label: String, _ code: StokerError.Code = .invalidConfiguration, field: String,
            _ change: @escaping @Sendable (inout StokerNode.Configuration) -> Void
        ) {
            self.label = label
            self.code = code
            self.field = field
            self.change = change
        }

        var testDescription: String { label }
    }

    /// One unusual value that must be accepted.
    struct Accepted: Sendable, CustomTestStringConvertible {
        let label: String
        let change: @Sendable (inout StokerNode.Configuration) -> Void

        init(_ label: String, _ change: @escaping @Sendable (inout StokerNode.Configuration) -> Void) {
            self.label = label
            self.change = change
        }

        var testDescription: String { label }
    }

    // MARK: - Timing

    static let badTimings: [Rejected] = [
        Rejected("lease zero", field: "lease") { $0.lease = .zero },
        Rejected("lease negative", field: "lease") { $0.lease = .seconds(-5) },
        Rejected("lease 50 ms (below 100 ms)", field: "lease") { $0.lease = .milliseconds(50) },
        Rejected("lease just below 100 ms", field: "lease") { $0.lease = .milliseconds(100) - .nanoseconds(1) },
        Rejected("lease 2 days (over one day)", field: "lease") { $0.lease = .seconds(2 * 86_400) },
        Rejected("lease Int64.max seconds", field: "lease") { $0.lease = .seconds(Int64.max) },
        Rejected("lease Int64.min seconds", field: "lease") { $0.lease = .seconds(Int64.min) },
        Rejected("heartbeatInterval zero", field: "heartbeatInterval") { $0.heartbeatInterval = .zero },
        Rejected("heartbeatInterval just over half of lease − margin", field: "heartbeatInterval") {
            $0.heartbeatInterval = .milliseconds(2_251)
        },
        Rejected("heartbeatInterval negative", field: "heartbeatInterval") { $0.heartbeatInterval = .seconds(-1) },
        Rejected("heartbeatInterval equal to lease", field: "heartbeatInterval") {
            $0.lease = .seconds(5)
            $0.heartbeatInterval = .seconds(5)
        },
        Rejected("heartbeatInterval equal to lease − default margin", field: "heartbeatInterval") {
            $0.lease = .seconds(5)
            $0.heartbeatInterval = .milliseconds(4_500)
        },
        Rejected("heartbeatInterval equal to lease − explicit margin", field: "heartbeatInterval") {
            $0.lease = .seconds(10)
            $0.margin = .seconds(2)
            $0.heartbeatInterval = .seconds(8)
        },
        Rejected("heartbeatInterval Int64.max seconds", field: "heartbeatInterval") {
            $0.heartbeatInterval = .seconds(Int64.max)
        },
        Rejected("retryInterval zero", field: "retryInterval") { $0.retryInterval = .zero },
        Rejected("retryInterval negative", field: "retryInterval") { $0.retryInterval = .milliseconds(-100) },
        Rejected("retryInterval over one day", field: "retryInterval") { $0.retryInterval = .seconds(86_401) },
        Rejected("margin zero", field: "margin") { $0.margin = .zero },
        Rejected("margin negative", field: "margin") { $0.margin = .seconds(-1) },
        Rejected("margin equal to lease / 2", field: "margin") {
            $0.lease = .seconds(5)
            $0.margin = .milliseconds(2_500)
        },
        Rejected("margin equal to lease", field: "margin") {
            $0.lease = .seconds(5)
            $0.margin = .seconds(5)
        },
        Rejected("statementTimeout zero", field: "statementTimeout") { $0.statementTimeout = .zero },
        Rejected("statementTimeout negative", field: "statementTimeout") { $0.statementTimeout = .seconds(-1) },
        Rejected("statementTimeout equal to lease", field: "statementTimeout") {
            $0.lease = .seconds(5)
            $0.statementTimeout = .seconds(5)
        },
        Rejected("reconnectDelay zero", field: "reconnectDelay") { $0.reconnectDelay = .zero },
        Rejected("reconnectDelay negative", field: "reconnectDelay") { $0.reconnectDelay = .seconds(-1) },
        Rejected("reconnectDelay above maximumReconnectDelay", field: "reconnectDelay") {
            $0.reconnectDelay = .seconds(10)
            $0.maximumReconnectDelay = .seconds(5)
        },
        Rejected("maximumReconnectDelay zero", field: "maximumReconnectDelay") { $0.maximumReconnectDelay = .zero },
    ]

    @Test("a bad timing value is refused, naming the field", arguments: badTimings)
    func badTiming(_ bad: Rejected) throws {
        var configuration = Self.base()
        bad.change(&configuration)
        let error = try #require(Self.constructionError(configuration))
        #expect(error.code == bad.code)
        #expect(error.message.contains(bad.field), "\(error.message)")
        #expect(error.description.contains(bad.field))
    }

    // MARK: - Names

    static let badNames: [Rejected] = [
        Rejected("cluster name empty", field: "cluster name") { $0.cluster = "" },
        Rejected("cluster name with a NUL byte", field: "cluster name") { $0.cluster = "bill\u{0}ing" },
        Rejected("cluster name 10 kB long", field: "cluster name") {
            $0.cluster = String(repeating: "c", count: 10_240)
        },
        Rejected("cluster name 256 bytes", field: "cluster name") { $0.cluster = String(repeating: "c", count: 256) },
        Rejected("node name empty", field: "node name") { $0.nodeName = "" },
        Rejected("node name with a NUL byte", field: "node name") { $0.nodeName = "\u{0}" },
        Rejected("node name 256 bytes", field: "node name") { $0.nodeName = String(repeating: "n", count: 256) },
        Rejected("node name 256 bytes of two-byte characters", field: "node name") {
            $0.nodeName = String(repeating: "é", count: 128)
        },
        Rejected("schema empty", .invalidIdentifier, field: "schema name") { $0.schema = "" },
        Rejected("schema 53 bytes", .invalidIdentifier, field: "schema name") {
            $0.schema = String(repeating: "s", count: 53)
        },
        Rejected("schema with a NUL byte", .invalidIdentifier, field: "schema name") { $0.schema = "sto\u{0}ker" },
    ]

    @Test("a bad name is refused, naming the field", arguments: badNames)
    func badName(_ bad: Rejected) throws {
        var configuration = Self.base()
        bad.change(&configuration)
        let error = try #require(Self.constructionError(configuration))
        #expect(error.code == bad.code)
        #expect(error.message.contains(bad.field), "\(error.message)")
        // A huge name is not repeated whole in the message.
        #expect(error.message.utf8.count < 1_000)
    }

    static let acceptedValues: [Accepted] = [
        Accepted("cluster name with quotes and unicode") { $0.cluster = "billing \"prod\" 'eu' — 日本語 🚀 ü\\n" },
        Accepted("cluster name exactly 255 bytes") { $0.cluster = String(repeating: "c", count: 255) },
        Accepted("node name exactly 255 bytes") { $0.nodeName = String(repeating: "n", count: 255) },
        Accepted("node name 255 bytes of mixed-width characters") {
            $0.nodeName = String(repeating: "é", count: 127) + "n"
        },
        Accepted("schema exactly 52 bytes") { $0.schema = String(repeating: "s", count: 52) },
        Accepted("schema with a double quote") { $0.schema = "my\"schema" },
        Accepted("lease exactly 100 ms") { $0.lease = .milliseconds(100) },
        Accepted("heartbeatInterval exactly half of lease − margin") { $0.heartbeatInterval = .milliseconds(2_250) },
        Accepted("lease exactly one day") { $0.lease = .seconds(86_400) },
        Accepted("a margin below the default guard: the guard shrinks to it") {
            $0.margin = .milliseconds(5)
        },
        Accepted("margin just below lease / 2") {
            $0.lease = .seconds(5)
            $0.margin = .milliseconds(2_500) - .nanoseconds(1)
        },
        Accepted("statementTimeout just below lease") {
            $0.lease = .seconds(5)
            $0.statementTimeout = .seconds(5) - .nanoseconds(1)
        },
        Accepted("reconnectDelay equal to maximumReconnectDelay") {
            $0.reconnectDelay = .seconds(5)
            $0.maximumReconnectDelay = .seconds(5)
        },
        Accepted("retryInterval exactly one day") { $0.retryInterval = .seconds(86_400) },
        Accepted("empty connection string (PG* environment)") { $0.connection = "" },
        // libpq reads an empty value as "not set": the port is then PGPORT or 5432, as with psql.
        Accepted("key=value with an empty port (libpq's default port)") { $0.connection = "host=a port=" },
        Accepted("key=value with a password and an empty port") { $0.connection = "host=a password=s3cr3t-pw port=" },
        Accepted("URL with a percent-encoded password") {
            $0.connection = "postgresql://svc:pa%40ss@db.internal:5432/app?sslmode=require"
        },
    ]

    @Test("an unusual but valid value is accepted", arguments: acceptedValues)
    func accepted(_ value: Accepted) throws {
        var configuration = Self.base()
        value.change(&configuration)
        let error = Self.constructionError(configuration)
        #expect(error == nil, "\(error.map(String.init(describing:)) ?? "")")
    }

    // MARK: - Connection strings

    struct BadConnection: Sendable, CustomTestStringConvertible {
        let label: String
        let connection: String
        /// Every password the string holds: none may show up in the error.
        let passwords: [String]
        var testDescription: String { label }
    }

    static let badConnections: [BadConnection] = [
        BadConnection(
            label: "URL with an unknown sslmode",
            connection: "postgresql://user:s3cr3t-pw@host:5432/db?sslmode=bogus", passwords: ["s3cr3t-pw"]),
        BadConnection(
            label: "key=value with a non-numeric port",
            connection: "host=a port=abc password=s3cr3t-pw", passwords: ["s3cr3t-pw"]),
        BadConnection(label: "unterminated double quote", connection: "\"not a url", passwords: []),
        BadConnection(
            label: "unterminated double quote with a password",
            connection: "\"not a url password=s3cr3t-pw", passwords: ["s3cr3t-pw"]),
        BadConnection(
            label: "key without '=' right after a password",
            connection: "host=a password=s3cr3t-pw dbname", passwords: ["s3cr3t-pw"]),
        BadConnection(
            label: "URL with a NUL byte",
            connection: "postgresql://user:s3cr3t-pw@host/db\u{0}?sslmode=disable", passwords: ["s3cr3t-pw"]),
        BadConnection(
            label: "key=value with a NUL byte", connection: "host=a\u{0} password=s3cr3t-pw",
            passwords: ["s3cr3t-pw"]),
        BadConnection(
            label: "URL whose password holds a raw '@'",
            connection: "postgresql://user:s3cr@t-pw@host/db", passwords: ["s3cr@t-pw", "s3cr", "t-pw@host"]),
    ]

    @Test("a malformed connection string is refused without repeating its password", arguments: badConnections)
    func badConnection(_ bad: BadConnection) throws {
        var configuration = Self.base()
        configuration.connection = bad.connection
        let error = Self.constructionError(configuration)
        let refused = try #require(error)
        #expect(refused.code == .invalidConnectionString)
        #expect(refused.message.contains("connection string") || refused.message.contains("URL"), "\(refused.message)")
        if let error { Self.expectNoPassword(bad.passwords, in: error) }
    }

    static func expectNoPassword(
        _ passwords: [String], in error: StokerError, sourceLocation: SourceLocation = #_sourceLocation
    ) {
        for password in passwords {
            #expect(!error.description.contains(password), "\(error.description)", sourceLocation: sourceLocation)
            #expect(!error.message.contains(password), sourceLocation: sourceLocation)
            #expect(!(error.serverMessage ?? "").contains(password), sourceLocation: sourceLocation)
            #expect(!(error.connection ?? "").contains(password), sourceLocation: sourceLocation)
        }
    }

    @Test("a configuration prints without its password (description, debugDescription, dump)")
    func redactedDescription() {
        var configuration = Self.base()
        configuration.connection = "postgresql://user:s3cr3t-pw@host:5432/db"
        var dumped = ""
        dump(configuration, to: &dumped)
        for text in ["\(configuration)", String(reflecting: configuration), dumped] {
            #expect(!text.contains("s3cr3t-pw"), "\(text)")
            #expect(text.contains("host"))
        }
    }

    // MARK: - Defaults

    @Test("the default configuration (only connection and cluster given) is valid")
    func defaultIsValid() throws {
        let configuration = StokerNode.Configuration(connection: "postgresql://localhost/app", cluster: "billing")
        #expect(configuration.schema == "stoker")
        #expect(configuration.migrate)
        #expect(configuration.heartbeatInterval == nil && configuration.margin == nil)
        #expect(configuration.statementTimeout == nil)
        let node = try StokerNode(configuration: configuration)
        #expect(node.configuration.cluster == "billing")
        #expect(node.configuration.nodeName == StokerNode.Configuration.defaultNodeName())
        #expect(node.member == nil)
    }

    @Test("the default timings derive from the lease")
    func derivedTimings() {
        var configuration = Self.base()
        configuration.lease = .seconds(10)
        #expect(configuration.effectiveHeartbeatInterval == .seconds(2))
        #expect(configuration.effectiveMargin == .seconds(1))
        #expect(configuration.effectiveStatementTimeout == .seconds(5))
        #expect(configuration.connectionCheckInterval == .seconds(1))
        configuration.lease = .seconds(2)
        #expect(configuration.connectionCheckInterval == .milliseconds(400))
    }

    @Test("the default node name is <hostname>:<pid>")
    func defaultNodeName() throws {
        let name = StokerNode.Configuration.defaultNodeName()
        #expect(!name.isEmpty)
        #expect(name.contains(":"))
        let pid = try #require(name.split(separator: ":").last)
        #expect(Int32(pid) != nil, "\(name)")
        #expect(!name.utf8.contains(0))
        #expect(name.utf8.count <= StokerNode.Configuration.maximumNameLength)
    }

    // MARK: - Activator

    struct Idle: StokerBehaviour {
        func initialState() -> Int { 0 }
        func handle(_ event: ActivatorEvent, state: inout Int, context: ActivatorContext) async throws {}
    }

    struct BadElection: Sendable, CustomTestStringConvertible {
        let label: String
        let name: String
        var testDescription: String { label }
    }

    @Test(
        "an activator refuses a bad election name",
        arguments: [
            BadElection(label: "empty", name: ""),
            BadElection(label: "with a NUL byte", name: "imp\u{0}orter"),
            BadElection(label: "300 bytes", name: String(repeating: "e", count: 300)),
            BadElection(label: "256 bytes", name: String(repeating: "e", count: 256)),
        ])
    func badElection(_ bad: BadElection) throws {
        let node = try StokerNode(configuration: Self.base())
        do {
            _ = try Activator(election: bad.name, node: node, behaviour: Idle())
            Issue.record("election name \(bad.label) was accepted")
        } catch {
            #expect(error.code == .invalidConfiguration)
            #expect(error.message.contains("election name"), "\(error.message)")
        }
    }

    @Test("an activator accepts a 255-byte unicode election name")
    func goodElection() throws {
        let node = try StokerNode(configuration: Self.base())
        let name = String(repeating: "é", count: 127) + "e"
        #expect(name.utf8.count == 255)
        let activator = try Activator(election: name, node: node, behaviour: Idle())
        #expect(activator.election == name)
        #expect(activator.dump().role == .unknown)
        #expect(activator.dump().node == "node-a")
    }

    // MARK: - application_name

    struct NamePair: Sendable, CustomTestStringConvertible {
        let label: String
        let cluster: String
        let node: String
        var testDescription: String { label }
    }

    @Test(
        "application_name fits 63 bytes and never cuts a character",
        arguments: [
            NamePair(label: "short ASCII", cluster: "billing", node: "host:42"),
            NamePair(label: "two-byte é × 40", cluster: String(repeating: "é", count: 40), node: "n"),
            NamePair(label: "odd offset before é", cluster: "x" + String(repeating: "é", count: 40), node: "n"),
            NamePair(label: "three-byte 日 × 30", cluster: String(repeating: "日", count: 30), node: "node"),
            NamePair(label: "four-byte 🚀 × 20", cluster: "a" + String(repeating: "🚀", count: 20), node: "node"),
            NamePair(label: "ZWJ family emoji", cluster: String(repeating: "👨‍👩‍👧‍👦", count: 4), node: "n"),
            NamePair(label: "255-byte ASCII names", cluster: String(repeating: "c", count: 255), node: "n"),
            NamePair(label: "exactly 63 bytes", cluster: String(repeating: "c", count: 61), node: "n"),
            NamePair(label: "exactly 64 bytes", cluster: String(repeating: "c", count: 62), node: "n"),
            NamePair(label: "long node name after é", cluster: "é", node: String(repeating: "ü", count: 100)),
        ])
    func applicationName(_ pair: NamePair) {
        let full = "\(pair.cluster):\(pair.node)"
        let name = NodeDriver.applicationName(cluster: pair.cluster, node: pair.node)
        #expect(name.utf8.count <= 63, "\(name.utf8.count) bytes")
        // A whole-character prefix of "<cluster>:<node>".
        #expect(full.hasPrefix(name))
        #expect(full.utf8.starts(with: name.utf8))
        #expect(String(validating: Array(name.utf8), as: UTF8.self) == name)
        #expect(full.unicodeScalars.starts(with: name.unicodeScalars))
        if full.utf8.count <= 63 {
            #expect(name == full)
        } else {
            // As long as it can be: the next character would not fit.
            let next = full[full.index(full.startIndex, offsetBy: name.count)]
            #expect(name.utf8.count + String(next).utf8.count > 63)
        }
    }

    @Test("application_name of 40 × é is 31 whole é")
    func applicationNameExact() {
        let name = NodeDriver.applicationName(cluster: String(repeating: "é", count: 40), node: "n")
        #expect(name == String(repeating: "é", count: 31))
        #expect(name.utf8.count == 62)
    }
}
