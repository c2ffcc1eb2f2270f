"The job store's contract, the same tests against SQLite (the default) and a real PostgreSQL server (tools/postgres.sh), where several job servers may share one database"
import json, threading, time
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import IntegrityError
from cerebrium_ft.store import Store

@pytest.fixture(params=['sqlite', 'postgresql'])
def location(request, tmp_path):
    "Where a store keeps its tables: a new SQLite file, or a new database on the session's PostgreSQL server"
    return tmp_path/'db.sqlite' if request.param == 'sqlite' else request.getfixturevalue('postgres_db')

def test_projects_keys_and_the_jobs_each_project_sees(location):
    st = Store(location)
    pa, ka = st.create_project('team a'); pb, kb = st.create_project('team b')
    assert (st.authenticate(ka), st.authenticate(kb)) == (pa, pb)
    assert [st.authenticate(k) for k in ('', 'nonsense', ka + 'x', 'cft_abc_def')] == [None] * 4
    k2 = st.create_key(pa); assert st.revoke_key(k2) and st.authenticate(k2) is None and st.authenticate(ka) == pa
    a1 = st.add_job(pa, 'first', {'x': 1}); time.sleep(0.01); a2 = st.add_job(pa, 'second', {'x': 2}); b1 = st.add_job(pb, 'theirs', {})
    assert [j['name'] for j in st.jobs(pa)] == ['second', 'first'] and st.job(b1['id'], pa) is None
    st.update(a2['id'], loss=float('inf')); json.dumps(st.jobs(pa), allow_nan=False)  # a loss that is not finite is served as null
    assert st.claim_next()['id'] == a1['id']  # oldest first
    st.update(a1['id'], status='succeeded', finished=time.time())
    assert (st.finish(a1['id'], 'cancelled'), st.request_cancel(a1['id']), st.job(a1['id'])['status']) == (False, None, 'succeeded')  # ended stays ended
    q = st.add_job(pa, 'waiting', {}); assert (st.request_cancel(q['id']), st.job(q['id'])['status']) == ('cancelled', 'cancelled')
    r = st.claim_next(); assert r['id'] == a2['id'] and r['attempts'] == 1
    assert st.requeue(r['id'], 'the server stopped', keep_attempt=False) and st.job(r['id'])['attempts'] == 0
    k = st.add_job(pa, 'keyed', {}, idempotency_key='submit-1', request_sha256='ab' * 32)
    assert st.job_for_key(pa, 'submit-1') == (k, 'ab' * 32) and st.job_for_key(pb, 'submit-1') is None
    with pytest.raises(IntegrityError): st.add_job(pa, 'again', {}, idempotency_key='submit-1')
    st.add_job(pb, 'theirs', {}, idempotency_key='submit-1')  # the same key in another project is another job

def test_two_servers_claiming_at_once_never_take_a_job_twice(location):
    "Two stores (two servers' executors) on one database, four threads each, claiming 24 jobs at once: each job is taken once, with one attempt"
    a, b = Store(location), Store(location)
    pid, _ = a.create_project('p')
    jobs = {a.add_job(pid, f'j{i}', {})['id'] for i in range(24)}
    claimed, lock = [], threading.Lock()
    def claim(st):
        while (j := st.claim_next()) is not None:
            with lock: claimed.append(j['id'])
    threads = [threading.Thread(target=claim, args=(st,)) for st in (a, b) * 4]
    for t in threads: t.start()
    for t in threads: t.join()
    assert sorted(claimed) == sorted(jobs)
    assert {a.job(j)['attempts'] for j in jobs} == {1}

def test_each_server_runs_only_the_jobs_it_stored(location):
    "Servers sharing a database show every job, but claim, and fail as lost, only the jobs whose files they hold; a job from before servers had ids runs anywhere"
    a, b = Store(location, home='s_a'), Store(location, home='s_b')
    pid, _ = a.create_project('p')
    ja, jb = a.add_job(pid, 'at a', {}), b.add_job(pid, 'at b', {})
    assert (b.job(ja['id'])['name'], b.job(ja['id'])['server']) == ('at a', 's_a')
    assert a.claim_next()['id'] == ja['id'] and a.claim_next() is None
    assert b.jobs_in('running') == []  # a's running job is not b's to fail as lost
    assert b.claim_next()['id'] == jb['id']
    old = Store(location).add_job(pid, 'from before', {})
    assert old['server'] is None and b.claim_next()['id'] == old['id']

def test_a_database_from_an_earlier_version_gains_the_new_columns(location):
    "Tables made by a version before resumed_from, best, gpus, servers and idempotency keys: the store opens them, keeps their jobs, and adds the columns"
    url = location if isinstance(location, str) else f"sqlite:///{location}"
    with create_engine(url).begin() as c:
        c.execute(text("CREATE TABLE projects (id VARCHAR(40) PRIMARY KEY, name VARCHAR(200), created FLOAT)"))
        c.execute(text("CREATE TABLE jobs (id VARCHAR(40) PRIMARY KEY, project_id VARCHAR(40), name VARCHAR(200), spec TEXT, status VARCHAR(16), created FLOAT, "
                       "started FLOAT, finished FLOAT, attempts INTEGER, error TEXT, phase VARCHAR(32), step INTEGER, total INTEGER, loss FLOAT, pid INTEGER, cancel_requested INTEGER)"))
        c.execute(text("INSERT INTO projects VALUES ('p_old', 'old', 0)"))
        c.execute(text("INSERT INTO jobs VALUES ('j_old', 'p_old', 'kept', '{}', 'succeeded', 0, 1, 2, 1, NULL, 'done', 5, 5, 0.1, NULL, 0)"))
    st = Store(location, home='s_new')
    j = st.job('j_old')
    assert (j['name'], j['resumed_from'], j['best'], j['gpus'], j['server']) == ('kept', None, None, None, None)
    st.add_job('p_old', 'new', {}, idempotency_key='k'); assert st.job_for_key('p_old', 'k')[0]['server'] == 's_new'
