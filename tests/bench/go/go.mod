module chatproxy/benchtool

go 1.19
