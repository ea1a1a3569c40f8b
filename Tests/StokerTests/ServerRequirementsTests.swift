import Testing

@testable import Stoker

@Suite("Server requirements")
struct ServerRequirementsTests {
    private func facts(
        version: Int = 150018,
        recovery: Bool = false,
        readOnly: Bool = false,
        protocolPID: Int32 = 10,
        pids: [Int32] = [10, 10, 10]
    ) -> ServerRequirements.Facts {
        .init(
            serverVersion: version,
            inRecovery: recovery,
            transactionReadOnly: readOnly,
            protocolBackendPID: protocolPID,
            backendPIDs: pids
        )
    }

    @Test("a direct read-write PostgreSQL 14+ passes, not behind a proxy")
    func accepted() throws {
        #expect(try ServerRequirements.check(facts()) == false)
        #expect(try ServerRequirements.check(facts(version: 140000)) == false)
    }

    @Test("PostgreSQL 13 is refused with its version named")
    func tooOld() {
        do {
            _ = try ServerRequirements.check(facts(version: 130011))
            Issue.record("accepted")
        } catch {
            #expect(error.code == .unsupportedServer)
            #expect(error.message.contains("13.11"))
            #expect(error.message.contains("14"))
        }
    }

    @Test("a hot standby and a read-only session are refused")
    func readOnly() {
        for input in [facts(recovery: true), facts(readOnly: true)] {
            #expect(throws: StokerError.self) { try ServerRequirements.check(input) }
            do { _ = try ServerRequirements.check(input) } catch { #expect(error.code == .readOnlySession) }
        }
    }

    @Test("differing backend pids betray transaction pooling; the fix is named")
    func pooled() {
        do {
            _ = try ServerRequirements.check(facts(protocolPID: 99, pids: [10, 11, 10]))
            Issue.record("accepted")
        } catch {
            #expect(error.code == .pooledConnection)
            #expect(error.message.contains("pool_mode=session"))
        }
    }

    @Test("behind a proxy: a probe sharing our backend, or our starving while it holds one, betrays pooling")
    func probed() {
        var shared = facts(protocolPID: 99, pids: [10, 10, 10])
        shared.probePID = 10
        var starved = facts(protocolPID: 99, pids: [10, 10])
        starved.probePID = 11
        starved.starvedWhileProbing = true
        for input in [shared, starved] {
            do {
                _ = try ServerRequirements.check(input)
                Issue.record("accepted \(input)")
            } catch {
                #expect(error.code == .pooledConnection)
            }
        }
        var own = facts(protocolPID: 99, pids: [10, 10, 10])
        own.probePID = 11
        #expect(throws: Never.self) { try ServerRequirements.check(own) }
    }

    @Test("a consistent backend behind a different protocol pid is a session-mode proxy: accepted, reported")
    func sessionProxy() throws {
        #expect(try ServerRequirements.check(facts(protocolPID: 4242, pids: [10, 10, 10])) == true)
    }

    @Test("version text", arguments: [(150018, "15.18"), (140000, "14.0"), (90624, "9.6.24")])
    func versionText(version: Int, text: String) {
        #expect(ServerRequirements.versionText(version) == text)
    }
}

@Suite("SQL names")
struct SQLNameTests {
    @Test(
        "bad names get .invalidIdentifier",
        arguments: ["", "a\0b", String(repeating: "x", count: 64), String(repeating: "é", count: 32)]
    )
    func refused(name: String) {
        do {
            try SQLName.validate(name, kind: "schema name")
            Issue.record("accepted \(name.debugDescription)")
        } catch {
            #expect(error.code == .invalidIdentifier)
        }
    }

    @Test(
        "names up to 63 bytes, quotes and unicode included, pass",
        arguments: ["stoker", "we\"ird name", "ünï", String(repeating: "x", count: 63)])
    func accepted(name: String) throws {
        try SQLName.validate(name, kind: "schema name")
    }

    @Test("schema names leave room for the channel suffix")
    func schemaLimit() {
        #expect(throws: StokerError.self) { try StokerSchema.validate(schema: String(repeating: "s", count: 53)) }
        #expect(throws: Never.self) { try StokerSchema.validate(schema: String(repeating: "s", count: 52)) }
    }
}
