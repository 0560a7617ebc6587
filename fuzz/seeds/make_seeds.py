"""Writes the hand-made seed inputs in fuzz/seeds/<target>/ (run from that
directory: python3 make_seeds.py). Each is a real message, session, SAML
response or configuration file; see docs/fuzzing.md."""
import struct, os, base64
def w(d, name, data):
    os.makedirs(d, exist_ok=True)
    open(os.path.join(d, name), 'wb').write(data)
def msg(tag, body): return tag + struct.pack('>I', len(body)+4) + body
def startup(ver, params):
    body = struct.pack('>I', ver) + b''.join(k+b'\0'+v+b'\0' for k,v in params) + b'\0'
    return struct.pack('>I', len(body)+4) + body
S='startup'
w(S,'seed-startup-3.0', startup(196608, [(b'user',b'arianna'),(b'database',b'mylab'),(b'application_name',b'psql'),(b'client_encoding',b'UTF8')]))
w(S,'seed-startup-3.2-options', startup(196610, [(b'user',b'bob'),(b'_pq_.compression',b'on')]))
w(S,'seed-ssl', struct.pack('>II', 8, 80877103))
w(S,'seed-gssenc', struct.pack('>II', 8, 80877104))
w(S,'seed-cancel', struct.pack('>III', 16, 80877102, 4242) + b'\x01\x02\x03\x04')
w(S,'seed-cancel-3.2', struct.pack('>III', 12+32, 80877102, 4242) + bytes(range(32)))
F='frame'
ext = msg(b'P', b'\0select $1\0\0\0') + msg(b'B', b'\0\0\0\0\0\x01\0\0\0\x011\0\0') + msg(b'D', b'P\0') + msg(b'E', b'\0\0\0\0\0') + msg(b'S', b'')
w(F,'seed-extended', b'\0\x0b' + b'12345678' + ext)
w(F,'seed-simple', b'\x03\x07' + b'abcdefgh' + msg(b'Q', b'select 1\0') + msg(b'X', b''))
srv = msg(b'T', b'\0\x01a\0\0\0\0\0\0\0\0\0\0\x17\0\x04\xff\xff\xff\xff\0\0') + msg(b'D', b'\0\x01\0\0\0\x011') + msg(b'C', b'SELECT 1\0') + msg(b'Z', b'I')
w(F,'seed-server', b'\x01\x0e' + b'87654321' + srv)
B='backend'
w(B,'seed-error', b'SFATAL\0VFATAL\0C28000\0MPAM authentication failed for user "arianna"\0Fauth.c\0L326\0Rauth_failed\0\0')
w(B,'seed-error-hint', b'SERROR\0VERROR\0C42501\0Mpermission denied\0Ddetail here\0Hrun aws sso login\0\0')
w(B,'seed-auth-cleartext', struct.pack('>I', 3))
w(B,'seed-auth-sasl', struct.pack('>I', 10) + b'SCRAM-SHA-256\0\0')
w(B,'seed-backend-key', struct.pack('>I', 7) + b'\x09'*32)
w(B,'seed-negotiate', struct.pack('>II', (3<<16)|2, 1) + b'_pq_.x\0')
w(B,'seed-complete', b'INSERT 0 5\0')
w(B,'seed-parameter-status', b'standard_conforming_strings\0off\0')
w(B,'seed-bind', b'p1\0s1\0\0\x01\0\0\0\x02\0\0\0\x0342a\xff\xff\xff\xff')
w(B,'seed-function-call', struct.pack('>I', 1598) + b'\0\x01\0\x01\0\x01\0\0\0\x04\0\0\0\x07')
A='audit_tap'
def sess(settings, chunks):
    out = bytes([settings])
    for side, data in chunks:
        while True:
            part, data = data[:127], data[127:]
            out += bytes([(0x80 if side == 's' else 0) | len(part)]) + part
            if not data: break
    return out
Z = msg(b'Z', b'I')
w(A,'seed-simple', sess(1, [('c', msg(b'Q', b'select 1; select 2\0')), ('s', msg(b'T', b'\0\0') + msg(b'C', b'SELECT 1\0') + msg(b'C', b'SELECT 1\0') + Z)]))
w(A,'seed-guard', sess(0, [('c', msg(b'Q', b"select 1\0")), ('c', msg(b'Q', b"ALTER USER me PASSWORD 'SCRAM-SHA-256$x'\0")), ('s', msg(b'C', b'SELECT 1\0') + Z), ('s', msg(b'E', b'SERROR\0C42501\0Mrefused\0\0') + Z)]))
w(A,'seed-extended-sync', sess(2|8, [('c', msg(b'P', b's1\0select $1::int\0\0\0') + msg(b'B', b'p1\0s1\0\0\0\0\x01\0\0\0\x0242') + msg(b'E', b'p1\0\0\0\0\0') + msg(b'S', b'')), ('s', msg(b'1', b'') + msg(b'2', b'') + msg(b'C', b'SELECT 1\0') + Z), ('c', msg(b'C', b'Ss1\0') + msg(b'S', b'')), ('s', msg(b'3', b'') + Z)]))
w(A,'seed-lexing', sess(1|32, [('s', msg(b'S', b'client_encoding\0SJIS\0') + msg(b'S', b'standard_conforming_strings\0on\0')), ('c', msg(b'Q', b"set standard_conforming_strings = off\0")), ('c', msg(b'Q', b"SELECT '\\' , ' ; CREATE ROLE x LOGIN PASSWORD $$pw$$ ; SELECT '--'\0")), ('s', msg(b'S', b'standard_conforming_strings\0off\0') + msg(b'C', b'SET\0') + Z)]))
w(A,'seed-copy', sess(1|16, [('c', msg(b'Q', b'copy t from stdin\0')), ('s', msg(b'G', b'\0\0\0')), ('c', msg(b'd', b'1\n2\n') + msg(b'c', b'')), ('s', msg(b'C', b'COPY 2\0') + Z)]))
w(A,'seed-names', sess(1, [('c', msg(b'Q', b'prepare q as select 1; declare c cursor with hold for select 1\0')), ('s', msg(b'C', b'PREPARE\0') + msg(b'C', b'DECLARE CURSOR\0') + Z), ('c', msg(b'Q', b'execute q; deallocate q; close c; discard all\0')), ('s', msg(b'C', b'SELECT 1\0') + msg(b'C', b'DEALLOCATE\0') + msg(b'C', b'CLOSE CURSOR\0') + msg(b'C', b'DISCARD ALL\0') + Z)]))
w(A,'seed-redact', sess(1, [('c', msg(b'Q', b"create user mapping for me server s options (user 'u', password 'p'); select dblink_connect('host=h password=secret')\0")), ('s', msg(b'C', b'CREATE USER MAPPING\0') + msg(b'C', b'SELECT 1\0') + Z)]))
w(A,'seed-function', sess(1|8, [('c', msg(b'F', struct.pack('>I', 1598) + b'\0\x01\0\0\0\x01\0\0\0\x01x\0\0')), ('s', msg(b'V', b'\0\0\0\x011') + Z)]))
SA='saml'
NS='urn:oasis:names:tc:SAML:2.0:assertion'
ATTR='https://aws.amazon.com/SAML/Attributes/'
def resp(attrs, t):
    a=''
    for name, vals in attrs:
        a += f'<saml:Attribute Name="{ATTR}{name}">' + ''.join(f'<saml:AttributeValue>{v}</saml:AttributeValue>' for v in vals) + '</saml:Attribute>'
    return (f'<samlp:Response xmlns:samlp="urn:oasis:names:tc:SAML:2.0:protocol" xmlns:saml="{NS}">'
      f'<saml:Assertion><saml:Subject><saml:SubjectConfirmation><saml:SubjectConfirmationData NotOnOrAfter="{t}"/>'
      f'</saml:SubjectConfirmation></saml:Subject><saml:Conditions NotOnOrAfter="{t}"/>'
      f'<saml:AttributeStatement>{a}</saml:AttributeStatement></saml:Assertion></samlp:Response>')
ROLE='arn:aws:iam::1:role/Dba,arn:aws:iam::1:saml-provider/Corp'
x1 = resp([('Role',[ROLE]),('RoleSessionName',['arianna@corp']),('SessionDuration',['3600']),('PrincipalTag:userName',['arianna'])], '2026-11-26T14:02:00Z')
x2 = resp([('Role',[ROLE,'arn:aws:iam::1:saml-provider/Corp,arn:aws:iam::1:role/ReadOnly']),('AccessControl:userName',['bob'])], '2025-12-31T23:59:00+01:00')
w(SA,'seed-response.xml', x1.encode())
w(SA,'seed-response.b64', base64.b64encode(x1.encode()))
w(SA,'seed-two-roles.xml', x2.encode())
w(SA,'seed-expired-offset.xml', resp([('Role',[ROLE]),('PrincipalTag:userName',['a'])], '0000-01-01T00:00:00+23:59').encode())
C='config'
doc = open(os.path.join(os.path.dirname(os.path.abspath(__file__)), '../../docs/configuration.md')).read()
toml = doc.split('```toml\n')[1].split('```')[0]
w(C,'seed-docs-reference.toml', toml.encode())
w(C,'seed-minimal.toml', b'[[endpoint]]\nupstream = "mydb.cluster-abc.eu-west-1.rds.amazonaws.com"\n')
w(C,'seed-two-endpoints.toml', b'''state_dir = "/srv/ca"
idle_timeout = "90m"
[audit]
mode = "sync"
dir = "/var/log/rip"
rotate_age = "1h"
[[endpoint]]
name = "writer"
upstream = "db.cluster-abc.eu-west-1.rds.amazonaws.com:5433"
listen = ["127.0.0.1:6432", "[::1]:6432"]
[[endpoint]]
name = "reader"
upstream = "db.cluster-ro-abc.eu-west-1.rds.amazonaws.com"
unix_socket = "/run/pg"
connect_to = "127.0.0.1:15432"
''')
w(C,'seed-gateway.toml', b'''[gateway]
id = "bastion.example.com"
trust_accounts = ["111122223333"]
instance = 1
peers = ["2=gw2.internal:5432"]
[[endpoint]]
upstream = "db.cluster-abc.eu-west-1.rds.amazonaws.com"
listen = ["0.0.0.0:5432"]
''')
w(C,'seed-via-gateway.toml', b'''[[endpoint]]
upstream = "db.cluster-abc.eu-west-1.rds.amazonaws.com"
gateway = "bastion.example.com:5432"
gateway_id = "bastion"
''')
# The gateway proof: one well-formed proof (its signatures are not valid:
# check() does not verify them, STS does), one without a token, a password.
P='proof'
nonce = '0123456789abcdef0123456789abcdef'
tok = 'FwoGZXIvYXdzEJr%2F%2Ftoken%3D'
sts = ('Action=GetCallerIdentity&Version=2011-06-15&X-Amz-Algorithm=AWS4-HMAC-SHA256&'
       'X-Amz-Credential=ASIAEXAMPLEKEY000001%2F20251126%2Feu-west-1%2Fsts%2Faws4_request&'
       'X-Amz-Date=20251126T180000Z&X-Amz-Expires=900&'
       'X-Amz-SignedHeaders=host%3Bx-rds-iam-proxy-gateway-id%3Bx-rds-iam-proxy-nonce&'
       f'X-Amz-Security-Token={tok}&X-Amz-Signature={"a" * 64}')
rds = ('demo.cluster-c0ffee.eu-west-1.rds.amazonaws.com:5432/?Action=connect&DBUser=arianna&'
       'X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=ASIAEXAMPLEKEY000001%2F20251126%2Feu-west-1%2Frds-db%2Faws4_request&'
       f'X-Amz-Date=20251126T180000Z&X-Amz-Expires=900&X-Amz-SignedHeaders=host&X-Amz-Security-Token={tok}&X-Amz-Signature={"b" * 64}')
w(P, 'seed-valid', f'rds-iam-proxy-proof-v1:{nonce}:{sts}:{rds}'.encode())
w(P, 'seed-no-token', f'rds-iam-proxy-proof-v1:{nonce}:{sts}:'.encode())
w(P, 'seed-password', b'hunter2')
