import Testing

@Suite struct LabPlaceholderTests {
    @Test func placeholder() {
        #expect(Bool(true))
    }
}
