import json,sys
for line in open('runs.jsonl'):
    r=json.loads(line); c=r['cfg']
    if sys.argv[1:] and not any(a in c['tag'] for a in sys.argv[1:]): continue
    print(c['tag'], r['final_val'])
    for h in r['hist']:
        if 'act' in h and h['step'] in (100,200,400,800,1000,1800):
            b=h['act']['blocks']
            print('  ',h['step'],'val',round(h['val'],3),'emb',round(h['act']['emb_rms'],2),'resid',[round(x.get('resid_rms',0),2) for x in b],'attnbr',[round(x.get('attn_branch_rms',0),1) for x in b],'ent',[round(x.get('attn_ent_norm',0),2) for x in b],'alog',[round(x.get('attn_logit_std',0),1) for x in b], 'wrms',{k:round(v['w_rms'],2) for k,v in h['opt'].items()})
