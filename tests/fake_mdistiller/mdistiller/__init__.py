"""Contract double of mdistiller for aekt-plugin's tests (see ../README.md); not mdistiller itself."""

IS_CONTRACT_DOUBLE = True
