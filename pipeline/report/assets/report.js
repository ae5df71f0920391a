(function(){
  function key(td){var v=td.getAttribute('data-v');
    if(v!==null){return v===''?Infinity:parseFloat(v);} return td.textContent.toLowerCase();}
  var n=0, tables=document.querySelectorAll('table.sortable');
  tables.forEach(function(t){
    t.querySelectorAll('th').forEach(function(th,c){
      th.addEventListener('click',function(){
        var asc=th.getAttribute('data-dir')!=='asc'; th.setAttribute('data-dir',asc?'asc':'desc');
        var tb=t.tBodies[0], rows=Array.prototype.slice.call(tb.rows);
        rows.sort(function(a,b){var x=key(a.cells[c]),y=key(b.cells[c]);
          return (x<y?-1:x>y?1:0)*(asc?1:-1);});
        rows.forEach(function(r){tb.appendChild(r);});
      }); n++;
    });
  });
  document.body.setAttribute('data-sortable-tables', String(tables.length));
  document.body.setAttribute('data-sortable-headers', String(n));
})();
