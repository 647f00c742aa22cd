"""The commands that are not plain LightningCLI, one module each (`cli.COMMANDS` names them):
`lightning` (fit, validate, test, predict; predict from an .onnx file), `check`, `optimize`,
`export`, `tune`, `cv`."""
